"""Base class of every dataset: a LightningDataModule that also names its task."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from compresslab.models.sources import DataSpec
from compresslab.tasks import Task


class TaskDataModule(L.LightningDataModule):
    modality: ClassVar[str]
    #: constructor arguments that change how data is served, not what it is
    loader_args: ClassVar[tuple[str, ...]] = ("batch_size", "eval_batch_size", "num_workers",
                                              "max_eval_batches", "cache_dir")

    def __init__(self, batch_size: int = 16, eval_batch_size: int | None = None,
                 num_workers: int = 0, max_eval_batches: int | None = None,
                 cache_dir: str = "outputs/cache"):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_eval_batches = max_eval_batches
        self.cache_dir = cache_dir
        self.task: Task
        self._splits: dict[str, Dataset] = {}

    # -- to implement -------------------------------------------------------
    def check(self) -> None:
        """Raise ConfigError for settings or files that cannot work (no real work)."""

    def load(self, tokenizer: Any | None = None) -> None:
        """Read/prepare the data (cached); fill ``self._splits``."""
        raise NotImplementedError

    def spec(self) -> DataSpec:
        raise NotImplementedError

    def shared_tokenizer(self) -> Any | None:
        """The tokenizer another dataset must use to feed a model trained on this one."""
        return None

    # -- shared -------------------------------------------------------------
    def split(self, name: str) -> Dataset:
        if not self._splits:
            raise RuntimeError("call load() before asking for data")
        return self._splits[name]

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        # seeded from the global RNG, which the pipeline seeds (base seed or run seed)
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        return DataLoader(self.split(name), batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, generator=generator,
                          drop_last=shuffle and len(self.split(name)) > batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def eval_dataloader(self, split: str) -> DataLoader:
        return self._loader(split, False, self.eval_batch_size)


def calibration_batches(data: TaskDataModule, num_samples: int, batch_size: int,
                        seed: int = 0) -> list:
    """``num_samples`` training examples drawn with a fixed seed, in batches.

    Text datasets serve blocks of their ``block_size`` tokens. The choice does not
    depend on the run seed, so every method sees the same calibration data.
    """
    from compresslab.errors import ConfigError

    train = data.split("train")
    if num_samples > len(train):
        raise ConfigError(f"asked for {num_samples} calibration samples but the train split "
                          f"has {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    picked = order[:num_samples].tolist()
    loader = DataLoader(torch.utils.data.Subset(train, picked), batch_size=batch_size,
                        shuffle=False)
    return list(loader)
