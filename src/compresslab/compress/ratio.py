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


def rank_for_ratio(in_features: int, out_features: int, ratio: float, round_to: int = 1,
                   round_slack: float | None = None) -> int:
    """Largest rank removing at least ``ratio`` of the weights, rounded down to a multiple of
    ``round_to``; with ``round_slack``, only when the rounding removes at most that much
    more of the layer's weights (a fraction of them) than the unrounded rank, else the
    unrounded rank. Aligned ranks run faster (multiples of 8: ~8-20% less time per FLOP
    on 1024-wide layers, docs/bench.md), and the slack keeps small layers, where one rank
    step is a large share of the weights, at the ratio asked for."""
    check_ratio(ratio)
    rank = math.floor(in_features * out_features * (1.0 - ratio) / (in_features + out_features))
    if round_to > 1:
        rounded = (rank // round_to) * round_to
        extra = (rank - rounded) * (in_features + out_features) / (in_features * out_features)
        if round_slack is None or extra <= round_slack:
            rank = rounded
    return rank


def lowrank_params(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features)


def achieved_ratio(dense_params: int, compressed_params: int) -> float:
    return 1.0 - compressed_params / dense_params


def resolve_rank(name: str, in_features: int, out_features: int, *, ratio: float | None,
                 rank: int | None, round_to: int = 1, round_slack: float | None = None) -> int:
    """The rank for one layer from either an explicit ``rank`` or a ``ratio``; checked."""
    full = min(in_features, out_features)
    if rank is not None:
        if int(rank) < 1:
            raise RatioError(f"rank {rank} is below 1 for layer {name} ({out_features}x"
                             f"{in_features}: rank must be in [1, {full}])")
        if int(rank) > full:
            raise RatioError(f"rank {rank} is larger than layer {name} allows "
                             f"({out_features}x{in_features}: rank must be in [1, {full}])")
        return int(rank)
    if ratio is None:
        raise RatioError("give either method.ratio or method.rank")
    k = rank_for_ratio(in_features, out_features, ratio, round_to, round_slack)
    if k < 1:
        raise RatioError(f"ratio {ratio} leaves rank {k} for layer {name} "
                         f"({out_features}x{in_features}, round_to={round_to}); lower the ratio")
    return k
