"""Width-reduced deep linear networks (docs/dln.md): pure torch, no Lightning.

- :func:`surrogate`: the matrix ``M_hat`` whose top singular vectors initialise the
  compressed network (factorization/completion ``P_Omega(M*)/p``, sensing
  ``(1/m) sum y_i A_i``).
- :func:`spectral_init`: the compressed network's weights ``eps V^T, eps I, ..., eps U``.
- Diagnostics of the paper's observations: when each end-to-end singular value is
  learned (and the predicted time), the rank of ``W_l(t) - W_l(0)`` and how many
  singular values of ``W_l(t)`` are still at ``eps``.
"""

from __future__ import annotations

import math

import torch


def surrogate(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``M_hat``: ``(1/m) sum_i y_i A_i`` for sensing, else ``P_Omega(M*) / p``."""
    if "A" in batch:
        return torch.einsum("i,ijk->jk", batch["y"], batch["A"]) / batch["y"].numel()
    mask = batch["mask"]
    return batch["target"] * mask / mask.mean()


def mean_curvature(batch: dict[str, torch.Tensor]) -> float:
    """Mean diagonal of the loss Hessian with respect to the end-to-end matrix
    (the factor ``c`` in ``grad ~ c (W - M*)``): ``1/numel`` for a masked half-MSE,
    ``sum ||A_i||^2 / numel`` for sensing."""
    if "A" in batch:
        return float(batch["A"].pow(2).sum()) / batch["target"].numel()
    return 1.0 / batch["target"].numel()


SPECTRAL_INITS = ("paper", "notebook")


def spectral_init(m_hat: torch.Tensor, width: int, depth: int,
                  eps: float, init: str = "paper") -> list[torch.Tensor]:
    """Layer weights (first to last) of the compressed network: with ``M_hat = U S V^T``,
    ``eps V[:, :width]^T``, ``eps I`` (middle layers), ``eps U[:, :width]`` (``paper``,
    the paper's formula), or at depth 2 ``[V^T, U]`` without the eps scale (``notebook``:
    how the authors' depth-2 notebook starts the compressed network)."""
    if depth < 2:
        raise ValueError("the compressed network needs at least two layers")
    if init == "notebook":
        if depth != 2:
            raise ValueError("the notebook's unscaled start [V^T, U] is for depth 2")
        eps = 1.0
    u, _, vh = torch.linalg.svd(m_hat, full_matrices=False)
    middle = [eps * torch.eye(width, dtype=m_hat.dtype) for _ in range(depth - 2)]
    return [eps * vh[:width].clone(), *middle, eps * u[:, :width].clone()]


def compressed_params(rows: int, cols: int, width: int, depth: int) -> int:
    """``width (rows + cols) + (depth - 2) width^2`` weights of the compressed network."""
    return width * (rows + cols) + (depth - 2) * width * width


def predicted_learning_time(sigma: float, eta: float, eps: float, depth: int) -> float:
    """Iterations until mode ``sigma`` is learned from an aligned start ``eps^L``.

    With ``s = u^L`` the gradient flow ``ds/dt = eta L s^(2-2/L) (sigma - s)`` has, while
    ``s << sigma``, ``du/dt = eta sigma u^(L-1)``: ``u`` blows up at
    ``t = 1 / ((L-2) eta sigma eps^(L-2))`` (for L = 3: ``1/(eta sigma eps)``); for
    L = 2 the growth is exponential and ``s`` reaches ``sigma/2`` at
    ``ln(sigma / (2 eps^2)) / (2 eta sigma)``. ``eta`` = learning rate x curvature.
    """
    if depth == 2:
        return math.log(sigma / (2 * eps * eps)) / (2 * eta * sigma)
    return 1.0 / ((depth - 2) * eta * sigma * eps ** (depth - 2))


def learning_times(steps: list[int], values: torch.Tensor, targets: torch.Tensor,
                   fraction: float = 0.5) -> list[int | None]:
    """First recorded step at which singular value ``i`` reaches ``fraction * targets[i]``
    (``values``: recorded steps x top-k singular values); None if never."""
    times = []
    for i, sigma in enumerate(targets.tolist()):
        reached = (values[:, i] >= fraction * sigma).nonzero()
        times.append(steps[int(reached[0])] if len(reached) else None)
    return times


def learned_in_order(times: list[int | None]) -> bool:
    """True when every mode is learned and larger ones (earlier indices) no later."""
    return all(t is not None for t in times) and all(a <= b for a, b in zip(times, times[1:]))


def update_rank(weight: torch.Tensor, initial: torch.Tensor, rtol: float = 1e-7) -> int:
    """Numerical rank of ``W(t) - W(0)``: singular values above ``rtol`` x the largest."""
    s = torch.linalg.svdvals(weight - initial)
    return int((s > rtol * s.max()).sum()) if s.max() > 0 else 0


def count_at_scale(weight: torch.Tensor, eps: float, rtol: float = 1e-3) -> int:
    """How many singular values of ``weight`` are still within ``rtol`` of ``eps``."""
    s = torch.linalg.svdvals(weight)
    return int(((s - eps).abs() <= rtol * eps).sum())
