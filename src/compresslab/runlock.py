"""A live run holds a lock on its run folder, so a second process cannot take it over.

Without it, a second process with the same run folder (the same ``hydra.run.dir``, a paper
target started twice, two ``resume=`` of one folder) would take the live run for an
interrupted one and "continue" it, overwriting its files. The lock is ``.run.lock`` in
the run folder, held with ``flock`` for as long as the run's process lives; the file
names the holder (pid, host, start time) for the refusal message. The kernel drops a
``flock`` when its process dies, however it dies (SIGKILL included), so a lock file left
by a dead process is stale by construction and simply taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from compresslab.distributed import is_main_process
from compresslab.errors import ConfigError

LOCK_FILE = ".run.lock"

log = logging.getLogger(__name__)

#: folder -> open file descriptor of the locks this process holds (re-entrant per process)
_held: dict[Path, int] = {}


def _holder(path: Path) -> str:
    """'pid N on host H since T' from the lock file, or 'another process'."""
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def in_use_error(folder: Path) -> ConfigError:
    return ConfigError(f"run folder {folder} is in use by a running run "
                       f"({_holder(folder / LOCK_FILE)}); wait for it to end or choose "
                       f"another folder")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def check_free(folder: Path) -> None:
    """Raise :func:`in_use_error` if a live process holds ``folder``'s lock (checks only)."""
    folder = Path(folder)
    if folder.resolve() in _held:
        return
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        if not _try_lock(fd):
            raise in_use_error(folder)
    except OSError:
        return  # a file system without flock: nothing to check
    finally:
        os.close(fd)


def acquire(folder: Path) -> bool:
    """Take ``folder``'s lock; False if this process held it already (or the file system
    cannot lock), True if it was taken now. A live holder: :func:`in_use_error`."""
    key = Path(folder).resolve()
    if key in _held:
        return False
    path = Path(folder) / LOCK_FILE
    stale = path.is_file()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"run folder {folder} is not writable: {exc.strerror}") from None
    try:
        locked = _try_lock(fd)
    except OSError as exc:  # e.g. NFS without locks: run unprotected rather than not at all
        os.close(fd)
        log.warning("cannot lock run folder %s (%s); not protected against a second run",
                    folder, exc)
        return False
    if not locked or os.fstat(fd).st_ino != _inode(path):  # lost a race with a release
        os.close(fd)
        raise in_use_error(Path(folder))
    if stale:
        log.info("taking over the lock of a run that is no longer running (%s)", _holder(path))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    _held[key] = fd
    return True


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def release(folder: Path) -> None:
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        (Path(folder) / LOCK_FILE).unlink()
    os.close(fd)


@contextlib.contextmanager
def hold(folder: Path):
    """Hold ``folder``'s lock for the body (the main process of a run only: the other
    processes of a DDP run work in the same folder). A folder created here to hold the
    lock is removed again if the body leaves it empty (e.g. a setting was refused)."""
    folder = Path(folder)
    if not is_main_process():
        yield
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    taken = acquire(folder)
    try:
        yield
    finally:
        if taken:
            release(folder)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
