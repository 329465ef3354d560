"""Symmetric positive-definite solves that repair instead of failing or returning NaN.

Calibration statistics (``X^T X``, the pruning Hessians) are positive semi-definite
in exact arithmetic but often singular in practice: fewer tokens than input channels,
dead channels, or a whole layer whose inputs are zero. Every factorisation goes through
:func:`cholesky_with_repair`: if the Cholesky factorisation fails (or a pivot is at
round-off level, :data:`PIVOT_RTOL`), the matrix is shifted
by ``-lambda_min + eps * unit`` (``unit``: the mean of the absolute diagonal, 1 when that
is 0), ``eps`` growing tenfold per failed retry; the shift is returned so the caller can
report it (``<stage>/cholesky_repairs`` and friends). NaN/Inf entries cannot be repaired:
they raise :class:`~compresslab.errors.NumericalError` naming the matrix.
"""

from __future__ import annotations

import logging

import torch

from compresslab.errors import NumericalError

log = logging.getLogger(__name__)

#: a Cholesky pivot (squared) below this fraction of the mean diagonal means the matrix is
#: singular to round-off (a factorisation that "succeeds" there solves into noise)
PIVOT_RTOL = 1e-13


def cholesky_with_repair(gram: torch.Tensor, eps: float = 1e-6, max_tries: int = 8,
                         what: str = "matrix") -> tuple[torch.Tensor, float]:
    """Lower ``L`` with ``gram + shift I = L L^T`` and the ``shift`` used (0 if none).

    Repair when ``gram`` is not positive definite (fewer tokens than inputs, dead
    channels): ``shift = -lambda_min + eps * mean(|diag|)``, ``eps`` growing tenfold per
    failed retry (the reference adds ``-lambda_min + 1e-6``; bigger models needed more).
    """
    gram = gram.double()
    if not bool(torch.isfinite(gram).all()):
        raise NumericalError(f"{what} has NaN/Inf entries (non-finite activations or "
                             f"weights); cannot factorise it")
    unit = float(gram.diagonal().abs().mean())
    unit = unit if unit > 0 else 1.0

    def factor(matrix):  # None unless positive definite with pivots above round-off
        chol, info = torch.linalg.cholesky_ex(matrix)
        ok = int(info) == 0 and float(chol.diagonal().min()) ** 2 >= PIVOT_RTOL * unit
        return chol if ok else None

    chol = factor(gram)
    if chol is not None:
        return chol, 0.0
    lam_min = float(torch.linalg.eigvalsh(gram)[0])
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    shift = 0.0
    for attempt in range(max_tries):
        shift = max(-lam_min, 0.0) + eps * unit * 10.0 ** attempt
        chol = factor(gram + shift * eye)
        if chol is not None:
            return chol, shift
    raise NumericalError(f"Cholesky of {what} failed after {max_tries} repairs "
                         f"(shift {shift:.3e})")


class RepairLog:
    """Counts the repairs of one stage's solves: ``report()`` gives
    ``{<name>_repairs, <name>_max_shift}`` for the stage's metrics."""

    def __init__(self, name: str):
        self.name = name
        self.count, self.max_shift = 0, 0.0

    def record(self, what: str, shift: float) -> None:
        if shift:
            self.count += 1
            self.max_shift = max(self.max_shift, shift)
            log.warning("%s is not positive definite; repaired with shift %.3e", what, shift)

    def report(self) -> dict[str, float]:
        return {f"{self.name}_repairs": self.count, f"{self.name}_max_shift": self.max_shift}


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, eps: float = 1e-6,
              what: str = "matrix", repairs: RepairLog | None = None) -> torch.Tensor:
    """``matrix^{-1} rhs`` for a symmetric positive (semi-)definite ``matrix`` (repaired)."""
    chol, shift = cholesky_with_repair(matrix, eps, what=what)
    if repairs is not None:
        repairs.record(what, shift)
    column = rhs.dim() == 1
    out = torch.cholesky_solve(rhs.double().reshape(len(rhs), -1), chol)
    return out.flatten() if column else out


def spd_inverse(matrix: torch.Tensor, eps: float = 1e-6, what: str = "matrix",
                repairs: RepairLog | None = None) -> torch.Tensor:
    """The inverse of a symmetric positive (semi-)definite ``matrix`` (repaired)."""
    chol, shift = cholesky_with_repair(matrix, eps, what=what)
    if repairs is not None:
        repairs.record(what, shift)
    return torch.cholesky_inverse(chol)
