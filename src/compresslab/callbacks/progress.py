"""Progress bars: Lightning's rich bar for trained loops, ``rich`` for the others."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.pytorch.callbacks import RichProgressBar

T = TypeVar("T")


def progress_enabled(cfg=None) -> bool:
    return bool(cfg is None or cfg.get("progress", True))


class StageProgressBar(RichProgressBar):
    """Rich bar named by what runs ("pretrain 120/300", "evaluate test") instead of
    Lightning's "Epoch 0/-2" (every fit is one long epoch of ``max_steps`` batches)."""

    def __init__(self, label: str | None = None):
        super().__init__(leave=True)
        self.label = label

    def _get_train_description(self, current_epoch: int) -> str:
        return self.label or super()._get_train_description(current_epoch)

    @property
    def validation_description(self) -> str:
        return f"{self.label} validation" if self.label else "Validation"

    @property
    def test_description(self) -> str:
        return self.label or "Testing"


def progress_callbacks(cfg, label: str | None = None) -> list:
    if not progress_enabled(cfg):
        return []
    return [StageProgressBar(label)]


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """``rich.progress.track`` that can be switched off (tests, logs)."""
    if not enabled:
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, transient=False)
