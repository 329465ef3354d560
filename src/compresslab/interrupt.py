"""Signals end a run with a non-zero exit, closed loggers and one line saying how to resume.

``SIGTERM`` (SLURM pre-emption, time limits, ``kill``), ``SIGINT`` (Ctrl-C) and ``SIGHUP``
(the terminal closed) raise :class:`RunInterrupted` wherever the run is, so the
pipeline's ``finally`` blocks close the W&B/CSV logger and Lightning records the fit as
interrupted. Without this, Lightning turns a ``SIGTERM`` during training into
``SystemExit(None)`` (exit code 0: a killed run would look like a success) and a signal
outside training leaves the logger open.

:func:`exit_on_signal` wraps ``run.py``: it installs the handlers, and on a signal prints
``interrupted by SIGTERM: run folder <dir> kept; continue it with: python run.py
resume=<dir>`` and exits with ``128 + signal number`` (143, 130, 129), the shell's
convention for a process ended by a signal.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from compresslab.run_folder import STATE_FILE

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: the folder of the run this process is running (set by the pipeline when it starts)
current_run_dir: Path | None = None


class RunInterrupted(BaseException):
    """A signal asked the run to stop (a BaseException, like KeyboardInterrupt, so that
    ``except Exception`` blocks do not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise_interrupted(signum, frame):
    # a repeated signal while the run shuts down is ignored: the loggers must get closed
    for other in SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise RunInterrupted(signum)


def install_handlers() -> dict[int, object]:
    """Install the handlers; returns the ones they replace."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, _raise_interrupted)
    return previous


def note_run_dir(run_dir: Path) -> None:
    global current_run_dir
    current_run_dir = Path(run_dir)


def interrupted_message(signum: int, run_dir: Path | None) -> str:
    name = signal.Signals(signum).name
    if run_dir is None or not (run_dir / STATE_FILE).is_file():
        where = f" (run folder {run_dir})" if run_dir is not None else ""
        return f"interrupted by {name} before the run started{where}; nothing to resume"
    return (f"interrupted by {name}: run folder {run_dir} kept; continue it with: "
            f"python run.py resume={run_dir}")


def signal_of(exc: BaseException) -> int | None:
    """The signal number behind ``exc``, if it stands for a signal."""
    if isinstance(exc, RunInterrupted):
        return exc.signum
    # Lightning's own SIGTERM handling; looked up, not imported: a process that never
    # imported Lightning cannot have raised it, and importing it costs seconds on every exit
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if lightning is not None and isinstance(exc, lightning.SIGTERMException):
        return int(signal.SIGTERM)
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None


@contextlib.contextmanager
def exit_on_signal():
    """Run the body with the handlers installed; a signal ends it with one line on stderr
    and exit code ``128 + signum``."""
    previous = install_handlers()
    try:
        yield
    except (RunInterrupted, KeyboardInterrupt, SystemExit) as exc:
        signum = signal_of(exc)
        if signum is None:  # a plain sys.exit(code)
            raise
        print(f"error: {interrupted_message(signum, current_run_dir)}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
