"""Base class of every dataset: a LightningDataModule that also names its task."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from compresslab.data.spec import DataSpec
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
        #: set by a trained stage for one fit: (seed, total steps); see :class:`StepSampler`
        self.train_schedule: tuple[int, int] | None = None

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

    def check_loader(self) -> None:
        """The loader settings every dataset shares (called with :meth:`check`)."""
        from compresslab.errors import ConfigError

        for key in ("batch_size", "eval_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.datamodule.{key} must be a positive integer, "
                                  f"got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"dataset.datamodule.num_workers must be >= 0, "
                              f"got {self.num_workers!r}")

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
        loader = self._loader("train", True, self.batch_size)
        if self.train_schedule is None or loader.batch_size is None:
            return loader  # no schedule, or one full batch served every step
        seed, total = self.train_schedule
        sampler = StepSampler(len(loader.dataset), loader.batch_size, seed, total,
                              start=lambda: self.trainer.global_step if self.trainer else 0)
        return DataLoader(loader.dataset, batch_size=sampler.step_batch, sampler=sampler,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          pin_memory=loader.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        """With several processes each example is evaluated once (no padded repeats)."""
        from compresslab.distributed import shard_eval_loader

        return shard_eval_loader(self._loader(split, False, self.eval_batch_size))


class StepSampler(DistributedSampler):
    """Training indices as a function of (seed, step): resuming at step ``k`` feeds the
    batches an uninterrupted run feeds from step ``k`` on.

    Step ``s`` takes slice ``s mod E`` of the permutation of epoch ``s // E`` (seeded by
    ``seed`` and the epoch; ``E`` full batches per epoch, the last partial one dropped;
    a train split smaller than the batch is one batch). With several data-parallel
    processes the batch of a step is split between them, rank ``r`` taking the ``r``-th
    part of each step's slice. Iteration starts at ``start()`` (the trainer's global step,
    read when the loader is iterated, i.e. after a checkpoint was restored) and ends at
    ``total``; the length is always ``total`` steps, which is what the loop counts to.
    It subclasses DistributedSampler only so that Lightning keeps it under DDP.
    """

    def __init__(self, size: int, batch_size: int, seed: int, total: int, start=lambda: 0):
        from compresslab.distributed import world

        # no super().__init__(): that needs a process group; the rank is read when iterating
        self.size, self.seed, self.total, self.start = size, int(seed), int(total), start
        self.step_batch = max(1, min(batch_size, size // world()[1]))
        self.epoch, self.shuffle, self.drop_last = 0, True, True

    def __len__(self) -> int:
        return self.total * self.step_batch

    def __iter__(self):
        from compresslab.distributed import world
        from compresslab.seeding import derive_seed

        rank, processes = world()
        chunk = self.step_batch * processes
        per_epoch = max(1, self.size // chunk)
        order, order_epoch = None, -1
        for step in range(int(self.start()), self.total):
            epoch, j = divmod(step, per_epoch)
            if epoch != order_epoch:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
                order, order_epoch = torch.randperm(self.size, generator=gen), epoch
            first = j * chunk + rank * self.step_batch
            yield from order[first:first + self.step_batch].tolist()


def require_file(path, what: str) -> None:
    """A data file the user named: it exists, is a readable file and is not empty."""
    import os
    from pathlib import Path

    from compresslab.errors import ConfigError

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} file does not exist: {p}")
    if not p.is_file():
        raise ConfigError(f"{what} is not a file: {p}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{what} file is not readable: {p}")
    if p.stat().st_size == 0:
        raise ConfigError(f"{what} file is empty: {p}")


def check_calibration_size(data: TaskDataModule, num_samples: int, what: str = "") -> None:
    """``num_samples`` calibration examples must exist in the loaded train split."""
    from compresslab.errors import ConfigError

    have = len(data.split("train"))
    if int(num_samples) > have:
        raise ConfigError(f"asked for {num_samples} calibration samples but the train split "
                          f"has {have}; lower {what or 'num_samples'}")


def model_inputs(batch):
    """The model's inputs of a batch: images of an ``(images, labels)`` pair, or the
    batch itself (text blocks are inputs and labels at once)."""
    return batch[0] if isinstance(batch, list | tuple) else batch


def calibration_batches(data: TaskDataModule, num_samples: int, batch_size: int,
                        seed: int = 0, with_labels: bool = False) -> list:
    """``num_samples`` training examples drawn with a fixed seed, in batches of model
    inputs (labels dropped: calibration only runs the model), or whole task batches
    with ``with_labels`` (for statistics of the task loss, e.g. FWSVD's Fisher rows).

    Text datasets serve blocks of their ``block_size`` tokens, image datasets their
    images. The choice does not depend on the run seed, so every method sees the same
    calibration data.
    """
    check_calibration_size(data, num_samples)
    train = data.split("train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    picked = order[:num_samples].tolist()
    loader = DataLoader(torch.utils.data.Subset(train, picked), batch_size=batch_size,
                        shuffle=False)
    return list(loader) if with_labels else [model_inputs(b) for b in loader]
