"""Progress bars: Lightning's rich bar for trained loops, ``rich`` for the others."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(cfg=None) -> bool:
    return bool(cfg is None or cfg.get("progress", True))


def progress_callbacks(cfg) -> list:
    if not progress_enabled(cfg):
        return []
    from lightning.pytorch.callbacks import RichProgressBar

    return [RichProgressBar(leave=True)]


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """``rich.progress.track`` that can be switched off (tests, logs)."""
    if not enabled:
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, transient=False)
