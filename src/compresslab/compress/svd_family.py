"""Data-aware SVD decomposers for LLMs (docs/spectrum.md): FWSVD, ASVD and SVD-LLM.

All three follow :class:`compresslab.compress.decomposer.Decomposer`'s call signature
``decomposer(weight, rank, name, stats) -> (left, right)``; the low-rank stage collects
``stats`` for them (see ``LowRankStage``). Every factorisation is computed in float64.

- :class:`FisherWeightedSVD`: rows scaled by the square root of their Fisher importance
  (summed squared gradients), truncated, scaling undone.
- :class:`ActivationAwareSVD`: columns scaled by ``mean|x_j|^alpha``, truncated,
  scaling undone.
- :class:`WhitenedSVD` (SVD-LLM): SVD of ``W L`` with ``X^T X = L L^T``; truncating the
  smallest whitened singular values minimises the layer's output error on the data.
"""

from __future__ import annotations

import logging

import torch

from compresslab.compress.calibration import ChannelMoments, Gram
from compresslab.compress.decomposer import Decomposer
from compresslab.compress.linalg import cholesky_with_repair  # noqa: F401  (also re-exported)
from compresslab.compress.lowrank import balanced_factors
from compresslab.errors import NumericalError

log = logging.getLogger(__name__)


def _scaled_truncation(weight: torch.Tensor, rank: int, row_scale: torch.Tensor | None = None,
                       col_scale: torch.Tensor | None = None):
    """Truncated SVD of ``diag(row) W diag(col)`` with the scalings undone in the factors."""
    w = weight.detach().double()
    if row_scale is not None:
        w = row_scale[:, None] * w
    if col_scale is not None:
        w = w * col_scale[None, :]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    left, right = balanced_factors(u, s, vh, rank)
    if row_scale is not None:
        left = left / row_scale[:, None]
    if col_scale is not None:
        right = right / col_scale[None, :]
    return left.to(weight.dtype), right.to(weight.dtype)


def positive_scale(values: torch.Tensor, floor: float, what: str = "a layer") -> torch.Tensor:
    """``values`` with entries below ``floor * mean`` raised to it (no division by zero);
    all ones when every entry is 0 (no calibration signal: the plain SVD)."""
    values = values.double()
    if not bool(torch.isfinite(values).all()):
        raise NumericalError(f"calibration statistics of {what} have NaN/Inf entries")
    mean = float(values.mean())
    if not mean > 0:
        return torch.ones_like(values)
    return values.clamp_min(floor * mean)


class FisherWeightedSVD(Decomposer):
    """FWSVD: ``I_i = sum (dL/dW_ij)^2`` over calibration batches and columns; SVD of
    ``diag(sqrt(I)) W``. Gradients come from the dense model (one backward pass per
    calibration batch, before any layer is changed). ``floor``: the smallest row weight,
    as a fraction of the mean (rows the data never reaches still get a weight)."""

    needs_calibration = True

    def __init__(self, floor: float = 1e-6):
        self.floor = floor

    def model_statistics(self, model, adapter, task, batches, layers):
        from compresslab.compress.calibration import squared_gradients

        return squared_gradients(model, adapter, task, batches, layers)

    def __call__(self, weight, rank, name, stats=None):
        return _scaled_truncation(weight, rank,
                                  row_scale=positive_scale(stats, self.floor, name).sqrt())


class ActivationAwareSVD(Decomposer):
    """ASVD: ``S = diag(mean|x_j|^alpha)``; SVD of ``W S``, right factor times ``S^-1``."""

    needs_calibration = True

    def __init__(self, alpha: float = 0.5, floor: float = 1e-6):
        self.alpha, self.floor = alpha, floor

    def input_statistic(self):
        return ChannelMoments()

    def __call__(self, weight, rank, name, stats=None):
        scale = positive_scale(stats.abs_mean, self.floor, name).pow(self.alpha)
        return _scaled_truncation(weight, rank, col_scale=scale)


class WhitenedSVD(Decomposer):
    """SVD-LLM truncation-aware whitening.

    ``C = X^T X`` over calibration tokens (float32 accumulation, float64 factorisation),
    ``C = L L^T``, ``W L = U S V^T``; factors ``U_k sqrt(S_k)`` and
    ``sqrt(S_k) V_k^T L^{-1}``. A ``C`` that is not positive definite is repaired by
    :func:`cholesky_with_repair` (``repair_eps``); every repair is reported.
    """

    needs_calibration = True

    def __init__(self, repair_eps: float = 1e-6, accumulate: str = "float32"):
        self.repair_eps = repair_eps
        self.accumulate = getattr(torch, accumulate)
        self.shifts: dict[str, float] = {}

    def input_statistic(self):
        return Gram(self.accumulate)

    def whiten(self, gram: torch.Tensor, name: str) -> torch.Tensor:
        chol, shift = cholesky_with_repair(gram, self.repair_eps,
                                           what=f"X^T X of {name or 'a layer'}")
        if shift:
            self.shifts[name] = shift
            log.warning("%s: X^T X is not positive definite; Cholesky repaired with shift %.3e",
                        name, shift)
        return chol

    def spectrum(self, weight: torch.Tensor, gram: torch.Tensor, name: str = ""):
        """``(U, s, V^T L^{-1})`` of the whitened weight, all components, float64."""
        chol = self.whiten(gram, name)
        u, s, vh = torch.linalg.svd(weight.detach().double() @ chol, full_matrices=False)
        # V^T L^{-1} = (L^{-T} V)^T, by a triangular solve instead of an inverse
        right = torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T
        return u, s, right

    def __call__(self, weight, rank, name, stats=None):
        u, s, right = self.spectrum(weight, stats.gram, name)
        left, right = balanced_factors(u, s, right, rank)
        return left.to(weight.dtype), right.to(weight.dtype)

    def report(self):
        return {"cholesky_repairs": len(self.shifts),
                "cholesky_max_shift": max(self.shifts.values(), default=0.0)}
