"""Text corpora as fixed-length token blocks, with a cached byte-level BPE tokenizer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from compresslab import integrity
from compresslab.data.base import TaskDataModule
from compresslab.data.spec import DataSpec
from compresslab.distributed import is_main_process, wait_for_file
from compresslab.filesystem import partial_file
from compresslab.tasks import LanguageModelingTask

EOS = "<|endoftext|>"
SPLITS = ("train", "val", "test")


class TokenBlocks(Dataset):
    """Non-overlapping blocks of ``block_size`` tokens cut from one long id array."""

    def __init__(self, ids: np.ndarray, block_size: int, max_blocks: int | None = None):
        n = len(ids) // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        self.ids, self.block_size, self.n = ids, block_size, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        s = i * self.block_size
        return torch.from_numpy(self.ids[s:s + self.block_size].astype(np.int64))


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (HF ``tokenizers``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class BPETokenizer:
    """Uniform wrapper over an HF ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.is_fast_lib = backend.__class__.__module__.startswith("tokenizers")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size() if self.is_fast_lib else len(self.backend)

    @property
    def eos_id(self) -> int:
        if self.is_fast_lib:
            return self.backend.token_to_id(EOS)
        eos = self.backend.eos_token_id
        return eos if eos is not None else 0

    def identity(self) -> str:
        if self.is_fast_lib:
            return hashlib.sha1(self.backend.to_str().encode()).hexdigest()[:12]
        return f"{getattr(self.backend, 'name_or_path', '')}:{self.vocab_size}"

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """All documents concatenated, each followed by the end-of-text token."""
        if self.is_fast_lib:
            encoded = [e.ids for e in self.backend.encode_batch(docs)]
        else:
            encoded = self.backend(docs, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for ids in encoded:
            out.extend(ids)
            out.append(self.eos_id)
        dtype = np.uint16 if self.vocab_size < 2**16 else np.int32
        return np.asarray(out, dtype=dtype)

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids))


def transformers_tokenizer(tokenizer):
    """A transformers tokenizer (for lm-eval, exported folders): the run's own, or its
    ``tokenizers`` object wrapped as a ``PreTrainedTokenizerFast`` (end-of-text token as
    EOS and padding)."""
    if not tokenizer.__class__.__module__.startswith("tokenizers"):
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def _cached_tokenizer(path: Path) -> BPETokenizer | None:
    """The cached tokenizer, or None once a damaged one is removed."""
    from tokenizers import Tokenizer

    problem = integrity.checksum_problem(path)
    if problem in (None, "no checksum recorded"):
        try:
            tokenizer = BPETokenizer(Tokenizer.from_file(str(path)))
        except Exception as exc:  # noqa: BLE001  (tokenizers raises plain Exceptions)
            problem = f"not a tokenizer: {str(exc).splitlines()[0][:200]}"
        else:
            if problem is not None:
                integrity.adopt_checksum(path)
            return tokenizer
    integrity.discard_damaged(path, problem, is_main_process())
    return None


class TextBlocksDataModule(TaskDataModule):
    """Language modelling on a text corpus split into train/val/test documents.

    Subclasses implement :meth:`documents` and :meth:`corpus_identity`. The
    tokenizer is either given (a local checkpoint's own) or a byte-level BPE
    trained on the train split; token arrays and the tokenizer are cached under
    ``cache_dir`` keyed by the corpus and tokenizer identity.
    """

    modality = "text"
    name = "text"

    def __init__(self, block_size: int = 128, vocab_size: int = 4096,
                 max_eval_blocks: int | None = 256, **kwargs):
        super().__init__(**kwargs)
        self.block_size, self.vocab_size, self.max_eval_blocks = (block_size, vocab_size,
                                                                  max_eval_blocks)
        self.task = LanguageModelingTask()
        self.tokenizer: BPETokenizer | None = None
        self.info: dict[str, Any] = {}

    def documents(self, split: str) -> list[str]:
        raise NotImplementedError

    def corpus_identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, tokenizer: Any | None = None) -> None:
        ident = self.corpus_identity()
        if tokenizer is None:
            folder = self._cache_folder({**ident, "bpe_vocab": self.vocab_size})
            tok_file = folder / "tokenizer.json"
            if not is_main_process():  # several processes (DDP): the main one writes caches
                wait_for_file(tok_file)
            self.tokenizer = _cached_tokenizer(tok_file) if tok_file.is_file() else None
            if self.tokenizer is None:
                folder.mkdir(parents=True, exist_ok=True)
                self.tokenizer = BPETokenizer(train_bpe(self.documents("train"), self.vocab_size))
                with partial_file(str(tok_file) + ".tmp", tok_file):
                    self.tokenizer.backend.save(str(tok_file) + ".tmp")
                Path(str(tok_file) + ".tmp").replace(tok_file)
                integrity.write_checksum(tok_file)
        else:
            self.tokenizer = BPETokenizer(tokenizer)
            folder = self._cache_folder({**ident, "tokenizer": self.tokenizer.identity()})
        ids = {s: self._cached_ids(folder, s) for s in SPLITS}
        limits = {"train": None, "val": self.max_eval_blocks, "test": self.max_eval_blocks}
        self._splits = {s: TokenBlocks(ids[s], self.block_size, limits[s]) for s in SPLITS}
        for s in SPLITS:
            if len(self._splits[s]) == 0:
                from compresslab.errors import ConfigError

                raise ConfigError(f"dataset {self.name}: the {s} split has fewer than "
                                  f"block_size={self.block_size} tokens")
        self.info = {**ident, "tokens": {s: int(len(ids[s])) for s in SPLITS},
                     "vocab_size": self.tokenizer.vocab_size,
                     "tokenizer": self.tokenizer.identity()}

    def _cache_folder(self, identity: dict[str, Any]) -> Path:
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return Path(self.cache_dir) / self.name / key

    def _cached_ids(self, folder: Path, split: str) -> np.ndarray:
        path = folder / f"{split}.npy"
        if not is_main_process():
            wait_for_file(path)
        ids = self._verified_ids(path) if path.is_file() else None
        if ids is None:
            folder.mkdir(parents=True, exist_ok=True)
            ids = self.tokenizer.encode_documents(self.documents(split))
            tmp = folder / f"{split}.tmp.npy"
            with partial_file(tmp, path):
                np.save(tmp, ids)
            tmp.replace(path)
            integrity.write_checksum(path)
            ids = np.load(path, mmap_mode="r")
        return ids

    def _verified_ids(self, path: Path) -> np.ndarray | None:
        """The cached token array, or None once a damaged one is removed."""
        problem = integrity.checksum_problem(path)
        if problem in (None, "no checksum recorded"):
            try:
                ids = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as exc:
                problem = f"not a token array: {str(exc).splitlines()[0]}"
            else:
                if problem is None:
                    return ids
                # written before checksums: check what can be checked, then record one
                if ids.ndim != 1 or (len(ids) and (int(ids.min()) < 0 or int(ids.max())
                                                   >= self.tokenizer.vocab_size)):
                    problem = "token ids outside the tokenizer's vocabulary"
                else:
                    integrity.adopt_checksum(path)
                    return ids
        integrity.discard_damaged(path, problem, is_main_process())
        return None

    def shared_tokenizer(self):
        return self.tokenizer.backend if self.tokenizer else None

    def spec(self) -> DataSpec:
        vocab = self.tokenizer.vocab_size if self.tokenizer else self.vocab_size
        return DataSpec("text", vocab_size=vocab)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer as transformers files (a ``tokenizers`` object is wrapped first)."""
    transformers_tokenizer(tokenizer).save_pretrained(folder)
