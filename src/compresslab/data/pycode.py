"""``pycode``: the Python standard library's own source as an embedded text corpus.

Files are found through ``sysconfig`` (test suites and site-packages excluded)
and assigned to train/val/test by a stable hash of their relative path, so the
split never changes between runs or machines with the same Python version. The
Python version and a hash of the corpus content are recorded with every run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from functools import cached_property
from pathlib import Path

from compresslab.data.text import TextBlocksDataModule
from compresslab.errors import ConfigError

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


def stdlib_files(root: str | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, excluding test suites."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(found)


def split_of(relative_path: str, val_percent: int, test_percent: int) -> str:
    """Stable split from the path's hash: last ``test_percent`` -> test, then val."""
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % 100
    if bucket >= 100 - test_percent:
        return "test"
    if bucket >= 100 - test_percent - val_percent:
        return "val"
    return "train"


class PyCodeDataModule(TextBlocksDataModule):
    name = "pycode"

    def __init__(self, root: str | None = None, max_files: int | None = None,
                 val_percent: int = 5, test_percent: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.root, self.max_files = root, max_files
        self.val_percent, self.test_percent = val_percent, test_percent

    def check(self) -> None:
        if self.root and not Path(self.root).is_dir():
            raise ConfigError(f"dataset=pycode root is not a folder: {self.root}")
        v, t = self.val_percent, self.test_percent
        if not (v > 0 and t > 0 and v + t < 100):
            raise ConfigError("dataset=pycode: val_percent and test_percent must be positive "
                              "and sum below 100")

    @cached_property
    def _files(self) -> dict[str, list[Path]]:
        base = Path(self.root or sysconfig.get_paths()["stdlib"])
        files = stdlib_files(str(base))
        if self.max_files:
            # a stable subset: the files whose path hash is smallest
            files = sorted(files, key=lambda p: hashlib.sha1(
                str(p.relative_to(base)).encode()).hexdigest())[:self.max_files]
        by_split: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
        for path in sorted(files):
            rel = str(path.relative_to(base))
            by_split[split_of(rel, self.val_percent, self.test_percent)].append(path)
        return by_split

    def documents(self, split: str) -> list[str]:
        return [p.read_text(encoding="utf-8", errors="replace") for p in self._files[split]]

    def corpus_identity(self) -> dict:
        digest = hashlib.sha1()
        for split in ("train", "val", "test"):
            for path in self._files[split]:
                digest.update(f"{split}:{path.name}:".encode())
                digest.update(path.read_bytes())
        return {"corpus": "pycode", "python": platform.python_version(),
                "content_sha1": digest.hexdigest()[:16],
                "files": {s: len(f) for s, f in self._files.items()}}
