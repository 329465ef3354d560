"""Rank <-> ratio arithmetic.

``ratio`` is everywhere the fraction of a layer's weight parameters *removed*.
A rank-k factorisation of an (out x in) matrix keeps ``k * (in + out)``
parameters, hence ``k = floor(in * out * (1 - ratio) / (in + out))``.
"""

from __future__ import annotations

import math

from compresslab.errors import ConfigError


class RatioError(ConfigError):
    """A ratio or rank that a layer cannot realise."""


def check_ratio(ratio: float, what: str = "ratio") -> float:
    if not (isinstance(ratio, int | float) and 0.0 < float(ratio) < 1.0):
        raise RatioError(f"{what} must lie strictly between 0 and 1, got {ratio!r}")
    return float(ratio)


def rank_for_ratio(in_features: int, out_features: int, ratio: float, round_to: int = 1) -> int:
    """Largest rank removing at least ``ratio`` of the weights, rounded down to ``round_to``."""
    check_ratio(ratio)
    rank = math.floor(in_features * out_features * (1.0 - ratio) / (in_features + out_features))
    if round_to > 1:
        rank = (rank // round_to) * round_to
    return rank


def lowrank_params(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features)


def achieved_ratio(dense_params: int, compressed_params: int) -> float:
    return 1.0 - compressed_params / dense_params


def resolve_rank(name: str, in_features: int, out_features: int, *, ratio: float | None,
                 rank: int | None, round_to: int = 1) -> int:
    """The rank for one layer from either an explicit ``rank`` or a ``ratio``; checked."""
    full = min(in_features, out_features)
    if rank is not None:
        if not 1 <= int(rank) <= full:
            raise RatioError(f"rank {rank} is larger than layer {name} allows "
                             f"({out_features}x{in_features}: rank must be in [1, {full}])")
        return int(rank)
    if ratio is None:
        raise RatioError("give either method.ratio or method.rank")
    k = rank_for_ratio(in_features, out_features, ratio, round_to)
    if k < 1:
        raise RatioError(f"ratio {ratio} leaves rank {k} for layer {name} "
                         f"({out_features}x{in_features}, round_to={round_to}); lower the ratio")
    return k
