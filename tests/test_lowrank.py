"""Exact facts of the low-rank core: full rank is lossless, truncation is Eckart-Young."""

import math

import pytest
import torch
from torch import nn

from compresslab.compress.lowrank import LowRankLinear, truncated_svd_factors
from compresslab.compress.ratio import (
    RatioError,
    achieved_ratio,
    lowrank_params,
    rank_for_ratio,
    resolve_rank,
)


@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)])
def test_full_rank_svd_reproduces_layer_outputs(shape):
    torch.manual_seed(0)
    out_f, in_f = shape
    dense = nn.Linear(in_f, out_f, dtype=torch.float64)
    left, right = truncated_svd_factors(dense.weight, min(shape))
    low = LowRankLinear.from_factors(left, right, dense.bias)
    x = torch.randn(32, in_f, dtype=torch.float64)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 5, 11])
def test_truncation_error_equals_eckart_young(rank):
    torch.manual_seed(1)
    w = torch.randn(30, 20, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    left, right = truncated_svd_factors(w, rank)
    error = (w - left @ right).pow(2).sum()
    assert math.isclose(float(error), float(s[rank:].pow(2).sum()), rel_tol=1e-10)
    # and no other rank-k matrix does better than the truncation (spot check)
    other = torch.randn(30, rank, dtype=torch.float64) @ torch.randn(rank, 20,
                                                                       dtype=torch.float64)
    assert (w - other).pow(2).sum() > error


def test_factors_are_balanced():
    torch.manual_seed(2)
    w = torch.randn(12, 8, dtype=torch.float64)
    left, right = truncated_svd_factors(w, 4)
    torch.testing.assert_close(left.T @ left, right @ right.T)


def test_rank_for_ratio_follows_the_documented_formula():
    assert rank_for_ratio(128, 128, 0.4) == math.floor(128 * 128 * 0.6 / 256) == 38
    assert rank_for_ratio(128, 352, 0.4) == math.floor(128 * 352 * 0.6 / 480)
    assert rank_for_ratio(128, 128, 0.4, round_to=8) == 32
    kept = lowrank_params(128, 128, 38)
    assert achieved_ratio(128 * 128, kept) >= 0.4


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(RatioError, match="strictly between 0 and 1"):
        rank_for_ratio(64, 64, ratio)


def test_rank_larger_than_layer_allows_is_rejected():
    with pytest.raises(RatioError, match="larger than layer q allows"):
        resolve_rank("q", 64, 32, ratio=None, rank=33)
    with pytest.raises(RatioError, match="leaves rank 0"):
        resolve_rank("q", 4, 4, ratio=0.9, rank=None)
    assert resolve_rank("q", 64, 32, ratio=0.5, rank=32) == 32


def test_lowrank_layer_rejects_impossible_rank():
    with pytest.raises(ValueError):
        LowRankLinear(8, 4, 5)
