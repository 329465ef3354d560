"""File systems that refuse to write: a full disk, a file-size limit, a read-only folder.

Every file the framework writes goes to ``<name>.tmp`` first and is renamed into place
(:func:`partial_file`); when the write fails the partial file is removed, so no later run
finds a half-written ``last.ckpt.tmp`` or weights file, and the failure becomes a
:class:`WriteFailure` naming the file. ``run.py`` reports it in one line
(:func:`exit_on_write_failure`) with exit code 1, and says how to continue the run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

#: what a file system says when it will not take a write
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                errno.EPERM}


class WriteFailure(OSError):
    """Writing ``filename`` failed; the partial file was removed."""


@contextlib.contextmanager
def partial_file(tmp: Path, target: Path):
    """The body writes ``tmp`` (later renamed to ``target``); on failure ``tmp`` is
    removed and the error, whatever library raised it, is a :class:`WriteFailure`."""
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        code = exc.errno if isinstance(exc, OSError) else None
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                  else str(exc).strip().splitlines()[0] if str(exc).strip()
                  else type(exc).__name__)
        raise WriteFailure(code, reason, str(target)) from None
    except BaseException:  # a signal: no half-written file either
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with partial_file(tmp, path):
        tmp.write_text(text)
    os.replace(tmp, path)


def write_failure_message(exc: OSError, run_dir: Path | None) -> str:
    from compresslab.run_folder import STATE_FILE

    text = f"cannot write {exc.filename}: {exc.strerror}"
    if run_dir is not None and (Path(run_dir) / STATE_FILE).is_file():
        text += f"; make room, then continue the run with: python run.py resume={run_dir}"
    return text


def exit_if_write_failure(exc: OSError) -> None:
    """A file system that refused a write ends ``run.py`` with one line and exit code 1;
    any other OSError is raised again."""
    if not (isinstance(exc, WriteFailure) or exc.errno in WRITE_ERRNOS):
        raise exc
    from compresslab import interrupt

    print(f"error: {write_failure_message(exc, interrupt.current_run_dir)}", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def exit_on_write_failure():
    """:func:`exit_if_write_failure` around the body (what runs outside Hydra's job)."""
    try:
        yield
    except OSError as exc:
        exit_if_write_failure(exc)
