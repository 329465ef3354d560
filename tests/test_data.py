"""Datasets: stable splits, cached tokenizers, local files in their real formats."""

import json

import numpy as np
import pytest
import torch

from compresslab.data.digits import DigitsDataModule
from compresslab.data.matrix import MatrixFactorizationDataModule, spread_low_rank_target
from compresslab.data.pycode import PyCodeDataModule, split_of, stdlib_files
from compresslab.data.text_files import TextFilesDataModule
from compresslab.errors import ConfigError


def test_pycode_split_is_stable_and_disjoint(tmp_path):
    files = stdlib_files()
    assert len(files) > 300 and not any("/test/" in str(f) for f in files)
    assert split_of("json/decoder.py", 5, 5) == split_of("json/decoder.py", 5, 5)
    dm = PyCodeDataModule(max_files=60, vocab_size=400, block_size=32, cache_dir=str(tmp_path))
    parts = {s: set(map(str, dm._files[s])) for s in ("train", "val", "test")}
    assert parts["train"] and not (parts["train"] & parts["val"] or parts["train"] & parts["test"])
    assert sum(map(len, parts.values())) == 60


def test_pycode_tokenizer_is_trained_once_and_cached(tmp_path):
    dm = PyCodeDataModule(max_files=40, vocab_size=400, block_size=32, cache_dir=str(tmp_path))
    dm.load()
    tok_file = next(tmp_path.rglob("tokenizer.json"))
    stamp = tok_file.stat().st_mtime_ns
    first = dm.split("test")[0]
    again = PyCodeDataModule(max_files=40, vocab_size=400, block_size=32,
                             cache_dir=str(tmp_path))
    again.load()
    assert tok_file.stat().st_mtime_ns == stamp
    assert torch.equal(again.split("test")[0], first)
    assert dm.info["python"] and len(dm.info["content_sha1"]) == 16
    # text round-trips through the tokenizer
    text = "def f(x):\n    return x + 1\n"
    ids = dm.tokenizer.backend.encode(text).ids
    assert dm.tokenizer.decode(ids) == text
    assert dm.spec().vocab_size == dm.tokenizer.vocab_size <= 400


def _write_corpus(folder, fmt):
    lines = [f"line {i} of a small corpus about compression number {i % 7}" for i in range(300)]
    paths = {}
    for split in ("train", "val", "test"):
        if fmt == "txt":
            p = folder / f"{split}.txt"
            p.write_text("\n".join(lines))
        elif fmt == "jsonl":
            p = folder / f"{split}.jsonl"
            p.write_text("\n".join(json.dumps({"text": t}) for t in lines))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            p = folder / f"{split}.parquet"
            pq.write_table(pa.table({"text": lines}), p)
        paths[split] = str(p)
    return paths


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_text_files_reads_local_formats(tmp_path, fmt):
    paths = _write_corpus(tmp_path, fmt)
    dm = TextFilesDataModule(**paths, vocab_size=300, block_size=16,
                             cache_dir=str(tmp_path / "cache"))
    dm.check()
    dm.load()
    block = dm.split("train")[0]
    assert block.shape == (16,) and len(dm.split("test")) > 10
    assert "compression" in dm.tokenizer.decode(np.concatenate(
        [dm.split("train")[i].numpy() for i in range(4)]))


def test_text_files_missing_file_is_reported(tmp_path):
    dm = TextFilesDataModule(train=str(tmp_path / "nope.txt"), val="x", test="y")
    with pytest.raises(ConfigError, match="does not exist"):
        dm.check()


def test_digits_split_is_stratified_and_complete():
    dm = DigitsDataModule()
    dm.load()
    sizes = {s: len(dm.split(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    labels = dm.split("test").tensors[1]
    assert set(labels.tolist()) == set(range(10))
    images = dm.split("train").tensors[0]
    assert images.shape[1:] == (1, 8, 8) and 0 <= images.min() and images.max() <= 1


def test_matrix_factorization_target_has_rank_r_spread_spectrum():
    d, r = 40, 4
    target = spread_low_rank_target(d, r, seed=3)
    g = torch.Generator().manual_seed(3)
    full = torch.linalg.svdvals(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.linalg.svdvals(target)
    torch.testing.assert_close(s[:r], full[[0, 5, 10, 15]])
    assert s[r] < 1e-10 * s[0]
    dm = MatrixFactorizationDataModule(d=d, r=r, target_seed=3)
    dm.load()
    batch = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(batch["target"], target)
