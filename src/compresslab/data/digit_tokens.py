"""``digit_tokens``: scikit-learn's 8x8 digits as class-conditional pixel-token sequences.

Each image becomes ``[class token, 64 pixel tokens in raster order]``: pixels are
quantised to ``levels`` grey levels (tokens ``0..levels-1``), the class token of
digit ``c`` is ``levels + c``. An autoregressive model (``model=ar_image``)
learns p(pixels | class); it is evaluated by the test NLL in bits per pixel and by
samples: a grid PNG per class and the accuracy of a fixed digits classifier
(logistic regression on the quantised training images) on the generated images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compresslab.data.base import TaskDataModule
from compresslab.data.digits import check_split_fractions, digits_arrays, stratified_split
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.tasks import LanguageModelingTask

CLASSES = 10
PIXELS = 64


class BitsPerPixelTask(LanguageModelingTask):
    """Next-token NLL of the pixel tokens (the class token is given), in bits per pixel."""

    primary_metric, higher_is_better = "bpp", False

    def metrics(self, sums):
        mean = sums["nll"] / sums["tokens"]
        return {"loss": mean, "bpp": mean / math.log(2)}


def quantise(images: np.ndarray, levels: int) -> np.ndarray:
    """Images in [0, 1] -> integer grey levels ``0..levels-1``, flattened in raster order."""
    return np.rint(images.reshape(len(images), -1) * (levels - 1)).astype(np.int64)


class DigitTokensDataModule(TaskDataModule):
    modality = "text"
    name = "digit_tokens"

    def __init__(self, levels: int = 4, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.levels, self.val_fraction, self.test_fraction = levels, val_fraction, test_fraction
        self.split_seed = split_seed
        self.task = BitsPerPixelTask()
        self.info: dict = {}
        self._pixels: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    def check(self) -> None:
        if not 2 <= self.levels <= 17:
            raise ConfigError(f"dataset=digit_tokens: levels must be in [2, 17], "
                              f"got {self.levels}")
        check_split_fractions("digit_tokens", self.val_fraction, self.test_fraction)

    def load(self, tokenizer=None) -> None:
        images, labels = digits_arrays()
        pixels = quantise(images, self.levels)
        parts = stratified_split(labels, self.val_fraction, self.test_fraction, self.split_seed)
        for split, idx in parts.items():
            self._pixels[split], self._labels[split] = pixels[idx], labels[idx]
            seqs = np.concatenate([self.levels + labels[idx, None], pixels[idx]], axis=1)
            self._splits[split] = torch.from_numpy(seqs)
        self.info = {"levels": self.levels, "split_seed": self.split_seed,
                     "sizes": {s: len(i) for s, i in parts.items()}}

    def spec(self) -> DataSpec:
        return DataSpec("text", vocab_size=self.levels + CLASSES)

    # -- samples ----------------------------------------------------------------------------
    def classifier(self):
        """Logistic regression on the quantised training images (deterministic)."""
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=2000)
        return clf.fit(self._pixels["train"] / (self.levels - 1), self._labels["train"])

    @torch.no_grad()
    def generate(self, model: nn.Module, adapter, per_class: int, seed: int,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` images of every class, sampled pixel by pixel; (images, labels)."""
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(CLASSES).repeat_interleave(per_class)
        seq = (self.levels + labels)[:, None]
        for _ in range(PIXELS):
            logits = adapter.logits(model, seq)[:, -1, :self.levels].float() / temperature
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            seq = torch.cat([seq, nxt], dim=1)
        return seq[:, 1:], labels

    def sample_quality(self, model: nn.Module, adapter, per_class: int, seed: int,
                       png: Path | None = None) -> dict[str, float]:
        """Classifier accuracy on generated images (and on real test images, for reference);
        writes the grid of samples (one row per class) to ``png``."""
        images, labels = self.generate(model, adapter, per_class, seed)
        clf = self.classifier()
        predicted = clf.predict(images.numpy() / (self.levels - 1))
        real = clf.score(self._pixels["test"] / (self.levels - 1), self._labels["test"])
        if png is not None:
            save_grid(images, self.levels, per_class, png)
        return {"classifier_acc": float((predicted == labels.numpy()).mean()),
                "classifier_real_acc": float(real)}


def save_grid(images: torch.Tensor, levels: int, per_class: int, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresslab.report import save_figure

    grid = images.reshape(CLASSES, per_class, 8, 8).permute(0, 2, 1, 3).reshape(
        CLASSES * 8, per_class * 8).numpy()
    fig, ax = plt.subplots(figsize=(per_class * 0.5 + 0.4, CLASSES * 0.5 + 0.4))
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=levels - 1, interpolation="nearest")
    ax.set_yticks([8 * c + 3.5 for c in range(CLASSES)], [str(c) for c in range(CLASSES)])
    ax.set_xticks([])
    return save_figure(fig, png, dpi=100)
