"""``digits``: scikit-learn's 8x8 handwritten digits (shipped with the package)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from compresslab.data.base import TaskDataModule
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.tasks import ClassificationTask


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images scaled to [0, 1] as (N, 1, 8, 8) float32, and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, np.ndarray]:
    """Index arrays per split, stratified by label, fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                  random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def check_split_fractions(dataset: str, val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ConfigError(f"dataset={dataset}: val_fraction and test_fraction must be "
                          "positive and sum below 1")


class DigitsDataModule(TaskDataModule):
    modality = "image"
    name = "digits"

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.val_fraction, self.test_fraction, self.split_seed = (val_fraction, test_fraction,
                                                                  split_seed)
        self.task = ClassificationTask()

    def check(self) -> None:
        check_split_fractions(self.name, self.val_fraction, self.test_fraction)

    def load(self, tokenizer=None) -> None:
        images, labels = digits_arrays()
        parts = stratified_split(labels, self.val_fraction, self.test_fraction, self.split_seed)
        self._splits = {s: TensorDataset(torch.from_numpy(images[i]), torch.from_numpy(labels[i]))
                        for s, i in parts.items()}

    def spec(self) -> DataSpec:
        return DataSpec("image", num_classes=10, image_size=8, channels=1)
