"""Errors that reach the user as one line (see the README's bad-input table)."""


class ConfigError(ValueError):
    """A setting, path or file that cannot work; reported before any work starts."""
