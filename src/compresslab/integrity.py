"""Checksums of cached artefacts (base model weights, tokenizers, token arrays).

Each cached file ``F`` gets a sidecar ``F.sha256`` written after it; on load the file is
hashed again and compared. Bytes overwritten inside a file whose header stays intact would
otherwise load silently (a NaN perplexity, or damage that stays finite and goes
unnoticed). A cache entry that fails the check is rebuilt by its owner; an entry written
before checksums existed (no sidecar) is checked for what can be checked (it loads, its
values are in range) and then gets its sidecar.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from compresslab.filesystem import atomic_write_text

log = logging.getLogger(__name__)

SUFFIX = ".sha256"


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def sidecar(path: Path) -> Path:
    return Path(str(path) + SUFFIX)


def write_checksum(path: Path) -> None:
    atomic_write_text(sidecar(path), sha256(path) + "\n")


def checksum_problem(path: Path) -> str | None:
    """None if ``path`` matches its recorded checksum; else what is wrong ('no checksum
    recorded' for an entry older than checksums)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        recorded = sidecar(path).read_text().strip()
    except FileNotFoundError:
        return "no checksum recorded"
    except (OSError, UnicodeDecodeError) as exc:
        return f"checksum unreadable ({exc})"
    if recorded != sha256(path):
        return "checksum mismatch: the file changed after it was written"
    return None


def adopt_checksum(path: Path) -> None:
    """Record the checksum of an entry written before checksums (best effort: a read-only
    cache stays as it is)."""
    try:
        write_checksum(path)
    except OSError as exc:
        log.debug("cannot record the checksum of %s: %s", path, exc)


def remove_entry(path: Path) -> None:
    """Remove a damaged cache file and its checksum, so that it is built again."""
    for file in (Path(path), sidecar(path)):
        file.unlink(missing_ok=True)


def discard_damaged(path: Path, problem: str, may_rebuild: bool) -> None:
    """A damaged cache entry: removed (its owner builds it again), or a one-line
    ConfigError where this process may not rebuild it or the cache cannot be written."""
    from compresslab.errors import ConfigError

    if not may_rebuild:
        raise ConfigError(f"cached {path} is damaged ({problem}); delete it and run again "
                          f"to rebuild it")
    log.warning("cached %s is damaged (%s); building it again", path, problem)
    try:
        remove_entry(path)
    except OSError as exc:
        raise ConfigError(f"cached {path} is damaged ({problem}) and the cache cannot be "
                          f"written ({exc.strerror}); delete it to rebuild it") from None
