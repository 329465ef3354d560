"""What compressing costs: wall time and peak resident memory of a run's stages.

The peak is the process's resident-set high-water mark (Linux ``VmHWM``), reset when the
stages start by writing ``5`` to ``/proc/self/clear_refs``; it thus counts everything
resident during the stages (the model, the data, calibration statistics, copies), not
what was freed before. Where the reset is not allowed, the peak is the process's since it
started and ``cost/peak_rss_reset`` is 0. ``cost/peak_rss_increase_bytes`` is the peak
less the RSS when the stages started: the memory the compression itself added.
"""

from __future__ import annotations

import time
from pathlib import Path

from compresslab.metrics.speed import current_rss_bytes, peak_rss_bytes


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark to its current RSS (Linux); False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class CompressionCost:
    """Started before the stages run; :meth:`metrics` once they finished."""

    def __init__(self):
        self.reset = reset_peak_rss()
        self.rss_start = current_rss_bytes()
        self.start = time.perf_counter()

    def metrics(self) -> dict[str, float]:
        peak = peak_rss_bytes()
        return {"cost/stages_s": time.perf_counter() - self.start,
                "cost/peak_rss_bytes": peak,
                "cost/peak_rss_increase_bytes": max(0, peak - self.rss_start),
                "cost/peak_rss_reset": int(self.reset)}
