"""``text_files``: any local text / json(l) / parquet corpus through HF ``datasets``.

Example (WikiText-2 saved on disk)::

    dataset=text_files dataset.train=/data/wikitext2/train.txt \
        dataset.val=/data/wikitext2/valid.txt dataset.test=/data/wikitext2/test.txt

Plain-text files are read line by line (HF's ``text`` builder) and each file
is one document; json/jsonl and parquet read the column ``text_field``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from compresslab.data.base import require_file
from compresslab.data.text import TextBlocksDataModule
from compresslab.errors import ConfigError

_FORMATS = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}


class TextFilesDataModule(TextBlocksDataModule):
    name = "text_files"

    def __init__(self, train: str | None = None, val: str | None = None,
                 test: str | None = None, text_field: str = "text", **kwargs):
        super().__init__(**kwargs)
        self.paths = {"train": train, "val": val, "test": test}
        self.text_field = text_field

    def check(self) -> None:
        for split, path in self.paths.items():
            if not path:
                raise ConfigError(f"dataset=text_files needs dataset.{split}=/path/to/file")
            p = Path(path).expanduser()
            require_file(p, f"dataset.{split}")
            if p.suffix not in _FORMATS:
                raise ConfigError(f"dataset.{split}: unsupported file type {p.suffix!r} "
                                  f"(use {', '.join(sorted(_FORMATS))})")

    def documents(self, split: str) -> list[str]:
        from datasets import load_dataset

        path = str(Path(self.paths[split]).expanduser())
        fmt = _FORMATS[Path(path).suffix]
        import datasets

        datasets.disable_progress_bars()   # (its bars and parser logs are not ours to show)
        log, level = logging.getLogger("datasets"), logging.getLogger("datasets").level
        log.setLevel(logging.CRITICAL)
        try:
            data = load_dataset(fmt, data_files={split: path}, split=split,
                                cache_dir=str(Path(self.cache_dir) / "hf_datasets"))
        except Exception as exc:  # noqa: BLE001  (datasets wraps parser errors in its own)
            reason = exc.__cause__ or exc
            raise ConfigError(f"dataset.{split}: cannot read {path} as {fmt}: "
                              f"{type(reason).__name__}: {str(reason).splitlines()[0]}") \
                from None
        finally:
            log.setLevel(level)
        if self.text_field not in data.column_names:
            raise ConfigError(f"dataset.{split} ({path}) has no column {self.text_field!r}; "
                              f"columns: {', '.join(data.column_names)}")
        lines = data[self.text_field]
        wrong = next((i for i, t in enumerate(lines) if t is not None and not isinstance(t, str)),
                     None)
        if wrong is not None:
            raise ConfigError(f"dataset.{split} ({path}): {self.text_field!r} of row "
                              f"{wrong + 1} is a {type(lines[wrong]).__name__}, not a text")
        if fmt == "text":  # one document per file, lines joined back
            return ["\n".join(lines)]
        return [t for t in lines if t]

    def corpus_identity(self) -> dict:
        digests = {s: hashlib.sha1(Path(p).expanduser().read_bytes()).hexdigest()[:16]
                   for s, p in self.paths.items()}
        return {"corpus": "text_files", "sha1": digests, "text_field": self.text_field}
