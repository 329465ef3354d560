"""What a model must know about its data to be built (vocabulary, classes, image or
matrix shape): each datamodule describes itself with one, and a saved plan records it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """What a model must know about its data to be built."""

    modality: str
    vocab_size: int | None = None
    num_classes: int | None = None
    image_size: int | None = None
    channels: int | None = None
    matrix_shape: tuple[int, int] | None = None
