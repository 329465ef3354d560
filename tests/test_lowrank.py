"""Exact facts of the low-rank core: full rank is lossless, truncation is Eckart-Young."""

import math

import pytest
import torch
from torch import nn

from compresslab.compress.lowrank import truncated_svd_factors
from compresslab.compress.ratio import (
    RatioError,
    achieved_ratio,
    lowrank_params,
    rank_for_ratio,
    resolve_rank,
)
from compresslab.layers.lowrank import LowRankLinear


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


def test_float32_weights_are_factorised_in_float32_as_well_as_in_float64():
    from compresslab.compress.decomposer import PlainSVD

    torch.manual_seed(3)
    w = torch.randn(96, 40)
    left, right = PlainSVD()(w, 12, "w")
    assert left.dtype == right.dtype == torch.float32
    ref_l, ref_r = PlainSVD("float64")(w, 12, "w")
    approx, ref = (left @ right).double(), (ref_l @ ref_r).double()
    assert float((approx - ref).norm() / w.double().norm()) < 1e-5
    # the truncation error is Eckart-Young's to float32 precision
    s = torch.linalg.svdvals(w.double())
    assert math.isclose(float((w.double() - approx).pow(2).sum()), float(s[12:].pow(2).sum()),
                        rel_tol=1e-5)


def test_lowrank_stage_releases_each_dense_layer_once_replaced():
    """Streaming: when a layer is factorised, every layer replaced before it is freed (no
    second copy of the compressed layers is held until the end of the stage)."""
    import gc
    import weakref

    from omegaconf import OmegaConf

    from compresslab.compress.svd_family import WhitenedSVD
    from compresslab.data.spec import DataSpec
    from compresslab.models.architecture import adapter_for
    from compresslab.models.llama import TinyLlama
    from compresslab.stages.base import RunContext
    from compresslab.stages.compress import LowRankStage

    torch.manual_seed(0)
    model = TinyLlama(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48).build(
        DataSpec("text", vocab_size=40))
    adapter = adapter_for(model)
    refs = {n: weakref.ref(m) for n, m in adapter.compressible_linears(model).items()}
    done: list[str] = []
    alive_before = []

    class Watching(WhitenedSVD):
        def __call__(self, weight, rank, name, stats=None):
            gc.collect()
            alive_before.append([n for n in done if refs[n]() is not None])
            done.append(name)
            return super().__call__(weight, rank, name, stats)

    class Tokens:            # the calibration samples' source (a datamodule's train split)
        task, block_size = None, 9

        def split(self, name):
            return [torch.randint(0, 40, (9,)) for _ in range(8)]

    ctx = RunContext(cfg=OmegaConf.create({"progress": False}), run_dir=None, adapter=adapter,
                     data=Tokens())
    stage = LowRankStage(Watching(), ratio=0.5, calibration={"num_samples": 8, "batch_size": 4})
    stage.name = "compress"
    stage.run(model, ctx)
    assert len(done) == len(refs) and not any(alive_before)


def test_round_slack_rounds_big_layers_and_keeps_small_ones_exact():
    # 1024x2816 at 0.5: rank 375; 368 removes 7 * 3840 / (1024 * 2816) = 0.9% more
    assert rank_for_ratio(1024, 2816, 0.5) == 375
    assert rank_for_ratio(1024, 2816, 0.5, round_to=8, round_slack=0.015) == 368
    # 128x352: 46 -> 40 would remove 6.4% more: the exact rank is kept
    assert rank_for_ratio(128, 352, 0.5, round_to=8, round_slack=0.015) == 46
    assert rank_for_ratio(128, 352, 0.5, round_to=8) == 40          # no slack: always
    assert resolve_rank("q", 2816, 1024, ratio=0.5, rank=None, round_to=64,
                        round_slack=0.015) == 375                     # 320: 7.3% more
    # the method configs' rounding leaves llama_tiny's layers (128 wide) at their exact
    # ranks at the table ratios, and rounds every 1024-wide layer
    from omegaconf import OmegaConf

    from conftest import CONFIGS

    cfg = OmegaConf.load(CONFIGS / "method_base" / "lowrank.yaml")  # every low-rank method
    for ratio in (0.2, 0.4, 0.6, 0.8):
        for shape in ((128, 128), (128, 352), (352, 128)):
            assert rank_for_ratio(*shape, ratio, cfg.round_to, cfg.round_slack) == \
                rank_for_ratio(*shape, ratio)
        for shape in ((1024, 1024), (1024, 2816), (2816, 1024)):
            assert rank_for_ratio(*shape, ratio, cfg.round_to, cfg.round_slack) % 8 == 0
    assert resolve_rank("q", 128, 128, ratio=0.4, rank=None, round_to=8,
                        round_slack=0.015) == 38
