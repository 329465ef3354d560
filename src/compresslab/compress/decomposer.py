"""Decomposers: turn one dense weight into low-rank factors.

Every decomposer has the same call signature, so a method's config picks one
with ``_target_``: ``decomposer(weight, rank, name, stats) -> (left, right)``
with ``weight ~= left @ right``, ``left`` (out, rank) and ``right`` (rank, in).
``stats`` carries calibration statistics for decomposers that need them
(``needs_calibration = True``); plain SVD ignores it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from compresslab.compress.lowrank import truncated_svd_factors


class Decomposer:
    needs_calibration: ClassVar[bool] = False

    def __call__(self, weight: torch.Tensor, rank: int, name: str,
                 stats: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- calibrated decomposers (``needs_calibration = True``) override these ---------------
    def input_statistic(self) -> Any | None:
        """A fresh ``InputStatistic`` collected on each layer's inputs, block by block on the
        already-compressed prefix (None: no input statistics needed)."""
        return None

    def model_statistics(self, model, adapter, task, batches, layers) -> dict[str, Any]:
        """Statistics that need the whole model (e.g. gradients), by layer name."""
        return {}

    def report(self) -> dict[str, float]:
        """Numbers worth logging after decomposing (e.g. numerical repairs)."""
        return {}


class PlainSVD(Decomposer):
    """Truncated SVD: the best rank-k approximation of W in Frobenius norm.

    ``dtype``: the precision of the SVD (null: the weight's own, at least float32;
    ``float64`` forces double precision, twice as slow for the same factors of a float32
    weight to ~1e-5 relative)."""

    def __init__(self, dtype: str | None = None):
        from compresslab.models.architecture import parse_dtype

        self.dtype = parse_dtype(dtype) if dtype else None

    def __call__(self, weight, rank, name, stats=None):
        return truncated_svd_factors(weight, rank, self.dtype)
