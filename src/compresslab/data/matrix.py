"""Synthetic matrix-recovery problems for deep linear networks (``docs/dln.md``).

Target ``M*``: the SVD of a d x d standard Gaussian matrix keeping r singular
triplets spread over the spectrum (indices 0, d/(2r), 2d/(2r), ... below d/2).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from compresslab.data.base import TaskDataModule
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.tasks import MatrixRecoveryTask


def spread_low_rank_target(d: int, r: int, seed: int) -> torch.Tensor:
    """Rank-``r`` float64 target with singular triplets taken at indices ``i*d/(2r)``."""
    g = torch.Generator().manual_seed(seed)
    u, s, vh = torch.linalg.svd(torch.randn(d, d, generator=g, dtype=torch.float64))
    idx = torch.tensor([i * d // (2 * r) for i in range(r)])
    return (u[:, idx] * s[idx]) @ vh[idx]


class RepeatedBatch(Dataset):
    """The same full batch, ``length`` times (full-batch gradient descent)."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int = 1000):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batch


class MatrixFactorizationDataModule(TaskDataModule):
    """Every entry of ``M*`` observed; recovery error over all entries."""

    modality = "matrix"
    name = "matrix_factorization"

    def __init__(self, d: int = 100, r: int = 10, target_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.d, self.r, self.target_seed = d, r, target_seed
        self.task = MatrixRecoveryTask()

    def check(self) -> None:
        if not 1 <= self.r <= self.d // 2:
            raise ConfigError(f"dataset.r={self.r} must be in [1, d/2] for d={self.d}")

    def make_batch(self) -> dict[str, torch.Tensor]:
        target = spread_low_rank_target(self.d, self.r, self.target_seed)
        ones = torch.ones_like(target)
        return {"target": target, "mask": ones, "eval_mask": ones}

    def load(self, tokenizer=None) -> None:
        batch = self.make_batch()
        self.batch = batch
        self._splits = {"train": RepeatedBatch(batch), "val": RepeatedBatch(batch, 1),
                        "test": RepeatedBatch(batch, 1)}

    def _loader(self, name, shuffle, batch_size):
        from torch.utils.data import DataLoader

        return DataLoader(self.split(name), batch_size=None, shuffle=False)

    def spec(self) -> DataSpec:
        return DataSpec("matrix", matrix_shape=(self.d, self.d))
