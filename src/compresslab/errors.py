"""Errors that reach the user as one line (see the README's bad-input table)."""


class ConfigError(ValueError):
    """A setting, path or file that cannot work; reported before any work starts."""


class NumericalError(FloatingPointError):
    """NaN/Inf met or produced (a loss, a statistic), or a matrix no documented repair
    could factorise; the run stops with one line naming where."""
