"""Image datasets read by torchvision from a local root (nothing is downloaded).

- ``cifar10``: the official python-format folder ``<root>/cifar-10-batches-py``
  (``data_batch_1..5``, ``test_batch``, ``batches.meta``). Those files are pickles, so
  by default their MD5 sums are checked against the official archive's before loading
  (``verify: true``); ``verify: false`` only checks that the files exist.
- ``imagefolder``: ``<root>/train/<class>/*.png|jpg`` and ``<root>/test/<class>/...``, and
  optionally ``<root>/val/<class>/...`` (otherwise ``val_fraction`` of train, seeded).

Images are resized to ``image_size``, converted to ``channels`` (1 or 3) and normalised
with ``mean``/``std`` (per channel; null: 0.5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from compresslab.data.base import TaskDataModule
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.tasks import ClassificationTask


def seeded_split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(train, val) subsets: a seeded permutation, the first ``val_fraction`` is val."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


class ToRGB:
    """PIL image -> RGB (a class, not a lambda, so loader workers can pickle it)."""

    def __call__(self, image):
        return image.convert("RGB")


class LocalImageDataModule(TaskDataModule):
    """Shared settings of the torchvision-backed image datasets."""

    modality = "image"
    name = "images"

    def __init__(self, root: str | None = None, image_size: int = 32, channels: int = 3,
                 val_fraction: float = 0.1, split_seed: int = 0,
                 mean: list[float] | None = None, std: list[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.root, self.image_size, self.channels = root, image_size, channels
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.mean = list(mean) if mean is not None else [0.5] * channels
        self.std = list(std) if std is not None else [0.5] * channels
        self.task = ClassificationTask()

    def check(self) -> None:
        if not self.root:
            raise ConfigError(f"dataset={self.name} needs a local folder: set dataset.root=/path")
        if not Path(self.root).expanduser().is_dir():
            raise ConfigError(f"dataset={self.name} root does not exist: {self.root}")
        if self.channels not in (1, 3):
            raise ConfigError(f"dataset={self.name}: channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"dataset={self.name}: mean and std need {self.channels} values")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"dataset={self.name}: val_fraction must lie in (0, 1)")

    def transform(self):
        from torchvision import transforms as T

        steps = [T.Grayscale(1) if self.channels == 1 else ToRGB(),
                 T.Resize((self.image_size, self.image_size)), T.ToTensor(),
                 T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def path(self) -> Path:
        return Path(self.root).expanduser()


class CIFAR10DataModule(LocalImageDataModule):
    name = "cifar10"

    def __init__(self, verify: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.verify = verify

    def check(self) -> None:
        super().check()
        folder = self.path() / "cifar-10-batches-py"
        missing = [f for f in ("data_batch_1", "test_batch", "batches.meta")
                   if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"dataset=cifar10: {folder} lacks {', '.join(missing)} "
                              "(expected the python-format CIFAR-10 folder)")

    def _dataset(self, train: bool):
        from torchvision.datasets import CIFAR10

        cls = CIFAR10 if self.verify else _unverified_cifar10()
        try:
            return cls(str(self.path()), train=train, transform=self.transform())
        except RuntimeError as exc:  # torchvision's message for missing or altered files
            raise ConfigError(f"dataset=cifar10 under {self.root}: {exc}") from None

    def load(self, tokenizer=None) -> None:
        train, val = seeded_split(self._dataset(True), self.val_fraction, self.split_seed)
        self._splits = {"train": train, "val": val, "test": self._dataset(False)}

    def spec(self) -> DataSpec:
        return DataSpec("image", num_classes=10, image_size=self.image_size,
                        channels=self.channels)


def _unverified_cifar10():
    from torchvision.datasets import CIFAR10

    class Unverified(CIFAR10):
        """CIFAR-10 reader that checks presence, not MD5 sums (verify: false)."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return Unverified


class ImageFolderDataModule(LocalImageDataModule):
    name = "imagefolder"

    def classes(self, split: str) -> list[str]:
        return sorted(p.name for p in (self.path() / split).iterdir() if p.is_dir())

    def check(self) -> None:
        super().check()
        for split in ("train", "test"):
            if not (self.path() / split).is_dir():
                raise ConfigError(f"dataset=imagefolder: {self.root} has no {split}/ folder")
        train = self.classes("train")
        if not train:
            raise ConfigError(f"dataset=imagefolder: {self.root}/train has no class folders")
        for split in ("val", "test"):
            if (self.path() / split).is_dir() and self.classes(split) != train:
                raise ConfigError(f"dataset=imagefolder: classes of {split}/ differ from "
                                  f"train/ ({self.classes(split)} vs {train})")

    def _folder(self, split: str):
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(self.path() / split), transform=self.transform())

    def load(self, tokenizer=None) -> None:
        if (self.path() / "val").is_dir():
            train, val = self._folder("train"), self._folder("val")
        else:
            train, val = seeded_split(self._folder("train"), self.val_fraction, self.split_seed)
        self._splits = {"train": train, "val": val, "test": self._folder("test")}

    def spec(self) -> DataSpec:
        return DataSpec("image", num_classes=len(self.classes("train")),
                        image_size=self.image_size, channels=self.channels)
