"""Kronecker-product SVD (Van Loan–Pitsianis) and spectrum-aware term selection.

A matrix W of shape (m*p) x (n*q) is a sum of Kronecker products
``W = sum_k A_k kron B_k`` with A_k (m x n) and B_k (p x q). The rearrangement

    R(W) = W.reshape(m, p, n, q).permute(0, 2, 1, 3).reshape(m*n, p*q)

turns each Kronecker product into a rank-one matrix ``vec(A) vec(B)^T`` (torch
``kron`` ordering), so the ordinary SVD of R(W) is the optimal Kronecker sum:
truncating it to K terms leaves squared error ``sum_{i>K} s_i^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compresslab.errors import ConfigError


def near_square_split(dim: int) -> tuple[int, int]:
    """(a, b) with a * b = dim, a <= b and a the largest divisor not above sqrt(dim)."""
    a = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return a, dim // a


@dataclass(frozen=True)
class KronShape:
    """W (m*p) x (n*q) = sum A (m x n) kron B (p x q)."""

    m: int
    n: int
    p: int
    q: int

    @classmethod
    def for_matrix(cls, out_features: int, in_features: int,
                   out_split: tuple[int, int] | None = None,
                   in_split: tuple[int, int] | None = None) -> KronShape:
        """Splits near square roots unless given: ``out_split`` = (m, p), ``in_split`` = (n, q)."""
        m, p = out_split or near_square_split(out_features)
        n, q = in_split or near_square_split(in_features)
        if m * p != out_features or n * q != in_features:
            raise ConfigError(f"Kronecker split ({m}, {p}) x ({n}, {q}) does not fit a "
                              f"{out_features} x {in_features} matrix")
        return cls(m, n, p, q)

    @property
    def term_params(self) -> int:
        """Trainable numbers of one term A_k, B_k."""
        return self.m * self.n + self.p * self.q

    @property
    def max_terms(self) -> int:
        return min(self.m * self.n, self.p * self.q)


def rearrange(w: torch.Tensor, shape: KronShape) -> torch.Tensor:
    m, n, p, q = shape.m, shape.n, shape.p, shape.q
    return w.reshape(m, p, n, q).permute(0, 2, 1, 3).reshape(m * n, p * q)


def unrearrange(r: torch.Tensor, shape: KronShape) -> torch.Tensor:
    m, n, p, q = shape.m, shape.n, shape.p, shape.q
    return r.reshape(m, n, p, q).permute(0, 2, 1, 3).reshape(m * p, n * q)


@dataclass
class KPSVD:
    """Terms ``A[k] kron B[k]`` with ``A[k] = sqrt(s_k) U_k`` and ``B[k] = sqrt(s_k) V_k``."""

    s: torch.Tensor      # (K,) descending
    a: torch.Tensor      # (K, m, n)
    b: torch.Tensor      # (K, p, q)

    def truncate(self, k: int) -> KPSVD:
        return KPSVD(self.s[:k], self.a[:k], self.b[:k])


def kpsvd(w: torch.Tensor, shape: KronShape, terms: int | None = None) -> KPSVD:
    """The (truncated) Kronecker-product SVD of ``w``, computed in float64."""
    u, s, vh = torch.linalg.svd(rearrange(w.detach().double(), shape), full_matrices=False)
    k = terms or len(s)
    root = s[:k].sqrt()
    a = (u[:, :k] * root).T.reshape(k, shape.m, shape.n)
    b = (vh[:k] * root[:, None]).reshape(k, shape.p, shape.q)
    return KPSVD(s[:k], a, b)


def kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Materialise ``sum_k kron(a[k], b[k])`` (deployment merge, tests)."""
    k, m, n = a.shape
    _, p, q = b.shape
    return torch.einsum("kij,kab->iajb", a, b).reshape(m * p, n * q)


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ (sum_k a[k] kron b[k])^T`` without forming the matrix: A_k X B_k^T per row."""
    k, m, n = a.shape
    _, p, q = b.shape
    xr = x.reshape(*x.shape[:-1], n, q)
    xb = torch.einsum("...jb,kab->...kja", xr, b)     # X B_k^T for every term
    y = torch.einsum("kij,...kja->...ia", a, xb)      # sum_k A_k (X B_k^T)
    return y.reshape(*x.shape[:-1], m * p)


# -- spectrum-aware number of terms -----------------------------------------------------------

def energy_terms(s: torch.Tensor, tau: float) -> int:
    """Smallest K with sum_{i<=K} s_i^2 / sum s_i^2 >= tau."""
    energy = s.double().pow(2)
    cumulative = energy.cumsum(0) / energy.sum()
    # tolerance: tau = 1 must be reachable despite rounding in the cumulative sum
    return int((cumulative < tau - 1e-12).sum()) + 1


class SecondDifferenceElbow:
    """K = the index i maximising s_{i-1} - 2 s_i + s_{i+1}: the first value of the flat tail."""

    def __call__(self, s: torch.Tensor) -> int:
        if len(s) < 3:
            return len(s)
        d2 = s[:-2] - 2 * s[1:-1] + s[2:]
        return int(d2.argmax()) + 1


class KneedleElbow:
    """Kneedle on the normalised decreasing spectrum: K = the index furthest below the chord."""

    def __call__(self, s: torch.Tensor) -> int:
        if len(s) < 3 or s[0] == s[-1]:
            return len(s)
        x = torch.linspace(0, 1, len(s), dtype=torch.float64)
        y = (s.double() - s[-1]) / (s[0] - s[-1])
        return max(1, int(((1 - x) - y).argmax()))


ELBOWS = {"second_difference": SecondDifferenceElbow, "kneedle": KneedleElbow}
COMBINE = {"min": min, "max": max, "energy": lambda e, _k: e, "elbow": lambda _e, k: k}


def elbow_rule(name: str):
    if name not in ELBOWS:
        raise ConfigError(f"unknown elbow rule {name!r} ({' | '.join(ELBOWS)})")
    return ELBOWS[name]()


def combine_rule(name: str):
    if name not in COMBINE:
        raise ConfigError(f"unknown combine rule {name!r} ({' | '.join(COMBINE)})")
    return COMBINE[name]


@dataclass
class TermSelector:
    """Per-layer K from energy (``tau``) and elbow, combined, clamped to [k_min, k_max]."""

    tau: float = 0.9
    elbow: str = "second_difference"
    combine: str = "max"
    k_min: int = 1
    k_max: int | None = None

    def check(self) -> None:
        if not 0 < self.tau <= 1:
            raise ConfigError(f"tau must lie in (0, 1], got {self.tau}")
        if self.k_min < 1 or (self.k_max is not None and self.k_max < self.k_min):
            raise ConfigError(f"need 1 <= k_min <= k_max, got k_min={self.k_min} "
                              f"k_max={self.k_max}")
        elbow_rule(self.elbow)
        combine_rule(self.combine)

    def __call__(self, s: torch.Tensor) -> int:
        k = combine_rule(self.combine)(energy_terms(s, self.tau), elbow_rule(self.elbow)(s))
        upper = min(len(s), self.k_max or len(s))
        return max(min(self.k_min, upper), min(k, upper))


def fit_budget(terms: dict[str, int], spectra: dict[str, torch.Tensor],
               term_params: dict[str, int], budget: int | None, k_min: int = 1
               ) -> dict[str, int]:
    """Drop the least valuable terms until the total trainable count fits ``budget``.

    A term's value is its share of its own layer's energy, s_k^2 / sum s^2, so layers
    of different scale compete fairly; every layer keeps at least ``k_min`` terms.
    """
    terms = dict(terms)
    if budget is None:
        return terms

    def total() -> int:
        return sum(terms[n] * term_params[n] for n in terms)

    share = {n: s.double().pow(2) / s.double().pow(2).sum() for n, s in spectra.items()}
    while total() > budget:
        droppable = [n for n in terms if terms[n] > k_min]
        if not droppable:
            raise ConfigError(f"trainable budget {budget} is below the minimum {total()} "
                              f"({k_min} term(s) per layer)")
        weakest = min(droppable, key=lambda n: float(share[n][terms[n] - 1]))
        terms[weakest] -= 1
    return terms
