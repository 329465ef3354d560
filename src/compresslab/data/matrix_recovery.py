"""Matrix completion, matrix sensing and real ratings for deep linear networks (docs/dln.md).

Beside :class:`~compresslab.data.matrix.MatrixFactorizationDataModule`:

- ``matrix_completion``: ``floor(p d^2)`` entries of ``M*`` observed, chosen uniformly;
  recovery error on the unobserved entries.
- ``matrix_sensing``: ``m`` Gaussian measurements ``y_i = <A_i, M*>`` with ``A_i`` iid
  ``N(0, 1/m^2)`` entries; recovery error ``||W - M*||_F / ||M*||_F``.
- ``ratings``: a local MovieLens-style ``user item rating`` file; a seeded share of the
  ratings is held out and the recovery error is measured on it.

Every batch holds ``target`` (and ``mask``/``eval_mask`` or ``A``/``y``), which is all
:func:`compresslab.compress.dln.surrogate` needs for the spectral initialisation.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from compresslab.data.matrix import MatrixFactorizationDataModule, spread_low_rank_target
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.tasks import Task


def uniform_mask(d: int, p: float, seed: int) -> torch.Tensor:
    """A d x d 0/1 float64 mask with exactly ``floor(p d^2)`` ones at uniform positions."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(d * d, generator=g)[:math.floor(p * d * d)]
    mask = torch.zeros(d * d, dtype=torch.float64)
    mask[chosen] = 1.0
    return mask.view(d, d)


class MatrixCompletionDataModule(MatrixFactorizationDataModule):
    """Observe ``floor(p d^2)`` uniformly chosen entries; evaluate on the others."""

    name = "matrix_completion"

    def __init__(self, d: int = 100, r: int = 5, p: float = 0.3, target_seed: int = 0,
                 mask_seed: int = 1, **kwargs):
        super().__init__(d=d, r=r, target_seed=target_seed, **kwargs)
        self.p, self.mask_seed = p, mask_seed

    def check(self) -> None:
        super().check()
        if not 0 < self.p < 1:
            raise ConfigError(f"dataset.p={self.p} must lie strictly between 0 and 1")

    def make_batch(self) -> dict[str, torch.Tensor]:
        target = spread_low_rank_target(self.d, self.r, self.target_seed)
        mask = uniform_mask(self.d, self.p, self.mask_seed)
        return {"target": target, "mask": mask, "eval_mask": 1.0 - mask}


class MatrixSensingTask(Task):
    """Loss ``1/2 sum_i (<A_i, W> - y_i)^2``; recovery errors over every entry of ``M*``."""

    primary_metric, higher_is_better = "recovery_rel", False
    shardable = False  # the end-to-end matrix, not a forward pass

    @staticmethod
    def measure(matrix: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
        return operators.flatten(1) @ matrix.flatten()

    def loss(self, model, adapter, batch):
        residual = self.measure(model.end_to_end(), batch["A"]) - batch["y"]
        return 0.5 * residual.pow(2).sum()

    def eval_sums(self, model, adapter, batch):
        w, target = model.end_to_end(), batch["target"]
        residual = self.measure(w, batch["A"]) - batch["y"]
        sq = (w - target).pow(2)
        return {"meas_sq": residual.pow(2).sum(), "err_fro_sq": sq.sum(),
                "n": torch.tensor(float(sq.numel()), dtype=torch.float64),
                "target_fro_sq": target.pow(2).sum()}

    def metrics(self, sums):
        return {"loss": 0.5 * sums["meas_sq"],
                "recovery_mse": 0.5 * sums["err_fro_sq"] / sums["n"],
                "recovery_rel": math.sqrt(sums["err_fro_sq"] / sums["target_fro_sq"])}


class MatrixSensingDataModule(MatrixFactorizationDataModule):
    """``m`` measurements ``y_i = <A_i, M*>``, ``A_i`` with iid ``N(0, 1/m^2)`` entries."""

    name = "matrix_sensing"

    def __init__(self, d: int = 200, r: int = 5, m: int = 4000, target_seed: int = 0,
                 operator_seed: int = 1, **kwargs):
        super().__init__(d=d, r=r, target_seed=target_seed, **kwargs)
        self.m, self.operator_seed = m, operator_seed
        self.task = MatrixSensingTask()

    def check(self) -> None:
        super().check()
        if self.m < 1:
            raise ConfigError(f"dataset.m={self.m} must be at least 1")
        if self.m * self.d * self.d > 4e8:
            raise ConfigError(f"dataset.m={self.m} with d={self.d} needs "
                              f"{8 * self.m * self.d ** 2 / 1e9:.1f} GB of operators; "
                              "lower m or d")

    def make_batch(self) -> dict[str, torch.Tensor]:
        target = spread_low_rank_target(self.d, self.r, self.target_seed)
        g = torch.Generator().manual_seed(self.operator_seed)
        operators = torch.randn(self.m, self.d, self.d, generator=g, dtype=torch.float64)
        operators /= self.m
        return {"target": target, "A": operators,
                "y": MatrixSensingTask.measure(target, operators)}


def read_ratings(path: Path) -> torch.Tensor:
    """(n, 3) float64 rows ``user item rating`` from a whitespace- or comma-separated file
    (MovieLens ``u.data`` and ``ratings.csv`` style; extra columns and a header ignored)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.replace(",", " ").replace("::", " ").split()
        if not fields:
            continue
        try:
            rows.append([float(f) for f in fields[:3]])
        except ValueError:
            if number == 1:  # a header line
                continue
            raise ConfigError(f"{path}:{number}: expected 'user item rating', got {line!r}") \
                from None
        if len(fields) < 3:
            raise ConfigError(f"{path}:{number}: expected 'user item rating', got {line!r}")
    if not rows:
        raise ConfigError(f"ratings file {path} holds no ratings")
    return torch.tensor(rows, dtype=torch.float64)


class RatingsDataModule(MatrixFactorizationDataModule):
    """Completion of a real user x item rating matrix read from a local file.

    Users and items are renumbered in sorted order; ``test_fraction`` of the ratings
    (seeded by ``split_seed``) are held out as the evaluation entries; ``r`` is the
    rank assumed by the compressed network (its width is ``2r``).
    """

    name = "ratings"

    def __init__(self, path: str | None = None, r: int = 10, test_fraction: float = 0.2,
                 split_seed: int = 0, **kwargs):
        super().__init__(d=1, r=r, **kwargs)
        self.path, self.test_fraction, self.split_seed = path, test_fraction, split_seed
        self._ratings: torch.Tensor | None = None

    def check(self) -> None:
        if not self.path:
            raise ConfigError("dataset=ratings needs a local file: set dataset.path=/path/u.data")
        if not Path(self.path).expanduser().is_file():
            raise ConfigError(f"dataset.path file does not exist: {self.path}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"dataset.test_fraction={self.test_fraction} must lie in (0, 1)")
        users, items = self.shape()
        if not 1 <= self.r <= min(users, items) // 2:
            raise ConfigError(f"dataset.r={self.r} must be in [1, min(users, items)/2] "
                              f"for a {users} x {items} rating matrix")

    def ratings(self) -> torch.Tensor:
        if self._ratings is None:
            path = Path(self.path).expanduser()
            self._ratings = read_ratings(path)
            self.info = {"file": str(path),
                         "sha1": hashlib.sha1(path.read_bytes()).hexdigest()[:12]}
        return self._ratings

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.ratings()
        _, users = torch.unique(rows[:, 0], return_inverse=True)
        _, items = torch.unique(rows[:, 1], return_inverse=True)
        return users, items

    def shape(self) -> tuple[int, int]:
        users, items = self.indices()
        return int(users.max()) + 1, int(items.max()) + 1

    def make_batch(self) -> dict[str, torch.Tensor]:
        users, items = self.indices()
        target = torch.zeros(self.shape(), dtype=torch.float64)
        target[users, items] = self.ratings()[:, 2]
        g = torch.Generator().manual_seed(self.split_seed)
        held_out = torch.randperm(len(users), generator=g)[:round(self.test_fraction * len(users))]
        eval_mask = torch.zeros_like(target)
        eval_mask[users[held_out], items[held_out]] = 1.0
        observed = torch.zeros_like(target)
        observed[users, items] = 1.0
        return {"target": target, "mask": observed - eval_mask, "eval_mask": eval_mask}

    def spec(self) -> DataSpec:
        return DataSpec("matrix", matrix_shape=self.shape())
