"""Numerical pruning and its baselines: exact facts of the algorithms, physical pruning."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from compresslab import load_compressed
from compresslab.checkpoints import save_compressed
from compresslab.compress.structured_pruning import (
    FluctuationScore,
    GlobalAllocation,
    LayerInputs,
    LayerScores,
    MagnitudeScore,
    NumericalScore,
    OBSCompensation,
    UniformAllocation,
    WandaScore,
    mask_hessian,
    numerical_mask,
    numerical_mask_newton,
    obs_update,
)
from compresslab.data.spec import DataSpec
from compresslab.models.architecture import adapter_for
from compresslab.models.llama import TinyLlama
from compresslab.models.vit import TinyViT
from compresslab.stages.base import RunContext
from compresslab.stages.prune import (
    LAYOUTS,
    StructuredPruneStage,
    params_per_structure,
    prunable_params,
)
from conftest import TINY_LLAMA, TINY_VIT, compose_cfg, read_metrics

VOCAB = 50
SOURCE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=40)


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(x: torch.Tensor) -> LayerInputs:
    stat = LayerInputs()
    stat.update(x)
    return stat


def _toy_layer(seed=0, tokens=200, d_in=12, d_out=7):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64) @ mix  # correlated
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    return x, weight


@pytest.mark.parametrize("lam", [0.1, 1.0, 100.0])
def test_closed_form_mask_equals_iterated_newton(lam):
    x, weight = _toy_layer()
    hl = mask_hessian(weight, x.T @ x, damping=1e-4)
    closed = numerical_mask(hl, keep=8.0, lam=lam)
    start = torch.rand(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    iterated = numerical_mask_newton(hl, keep=8.0, lam=lam, steps=50, start=start)
    torch.testing.assert_close(closed, iterated, rtol=1e-9, atol=1e-9)
    # it is the minimiser: the gradient vanishes there
    grad = hl @ (closed - 1) + lam * (closed.sum() - 8.0)
    assert grad.abs().max() < 1e-9
    # and the criterion's Newton option gives the same structure scores
    stat = _inputs(x)
    torch.testing.assert_close(NumericalScore(1 / 3, lam, 1e-4)(weight, stat, 3),
                               NumericalScore(1 / 3, lam, 1e-4, newton_steps=5)(weight, stat, 3))


def test_obs_equals_least_squares_and_lowers_error():
    x, weight = _toy_layer()
    pruned = torch.tensor([1, 4, 5, 9])
    kept = torch.tensor([i for i in range(12) if i not in pruned.tolist()])
    target = x @ weight.T
    updated = obs_update(weight, x.T @ x, pruned, damping=0.0)
    # brute force: the kept rows minimise ||X W - X_kept W_kept'|| (least squares)
    best = torch.linalg.lstsq(x[:, kept], target).solution.T
    torch.testing.assert_close(updated[:, kept], best, rtol=1e-7, atol=1e-7)
    assert updated[:, pruned].abs().max() == 0
    # with damping: the ridge solution of the same problem
    gamma = 0.05 * (2 * x.T @ x).diagonal().mean()
    damped = obs_update(weight, x.T @ x, pruned, damping=0.05)
    xk = x[:, kept]
    ridge = torch.linalg.solve(2 * xk.T @ xk + gamma * torch.eye(len(kept), dtype=x.dtype),
                               2 * xk.T @ target + gamma * weight[:, kept].T).T
    torch.testing.assert_close(damped[:, kept], ridge, rtol=1e-7, atol=1e-7)
    # compensation lowers the layer's output error against plain deletion
    plain = weight.clone()
    plain[:, pruned] = 0
    err = {name: (x @ w.T - target).norm() for name, w in
           (("plain", plain), ("obs", updated), ("damped", damped))}
    assert err["obs"] < err["damped"] < err["plain"]
    layer = torch.nn.Linear(12, 7, bias=False, dtype=torch.float64)
    layer.weight.data.copy_(weight)
    OBSCompensation(0.0)(layer, _inputs(x), pruned)
    torch.testing.assert_close(layer.weight.data, updated)


# a consuming layer (out 2 x in 4) with column norms 1, 3, 2, 4, and two tokens whose
# channels have population variances 0.25, 1, 0, 0 and L2 norms 5, sqrt(2), 0, sqrt(8)
HAND_W = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]], dtype=torch.float64)
HAND_X = torch.tensor([[3.0, 1.0, 0.0, 2.0], [4.0, -1.0, 0.0, 2.0]], dtype=torch.float64)


def test_magnitude_sums_the_column_norms_of_a_head():
    stat = _inputs(HAND_X)
    torch.testing.assert_close(MagnitudeScore()(HAND_W, stat, 1),
                               torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64))
    # heads {0, 1} and {2, 3}: 1 + 3 and 2 + 4 (their joint norms would be sqrt 10, sqrt 20)
    torch.testing.assert_close(MagnitudeScore()(HAND_W, stat, 2),
                               torch.tensor([4.0, 6.0], dtype=torch.float64))


def test_wanda_scores_by_hand():
    stat = _inputs(HAND_X)
    r2 = math.sqrt(2)
    # mean_i |W_ij| = 0.5, 1.5, 1, 2 times ||X_j|| = 5, sqrt 2, 0, 2 sqrt 2
    channel = torch.tensor([2.5, 1.5 * r2, 0.0, 4 * r2], dtype=torch.float64)
    torch.testing.assert_close(WandaScore()(HAND_W, stat, 1), channel)
    torch.testing.assert_close(WandaScore()(HAND_W, stat, 2),
                               torch.tensor([2.5 + 1.5 * r2, 4 * r2], dtype=torch.float64))


def test_flap_standardises_channels_then_averages_heads():
    stat = _inputs(HAND_X)
    # fluctuation Var(X_j) ||W_:,j||^2 = 0.25, 9, 0, 0: MLP channels (group 1) standardised
    # with mean 2.3125 and unbiased variance 19.890625
    sd = math.sqrt(19.890625)
    mlp = torch.tensor([-2.0625, 6.6875, -2.3125, -2.3125], dtype=torch.float64) / sd
    torch.testing.assert_close(FluctuationScore()(HAND_W, stat, 1), mlp)
    # attention channels are squared first (0.0625, 81, 0, 0; mean 20.265625, unbiased
    # variance 1639.4072265625), standardised, then averaged per head of 2 channels
    sd = math.sqrt(1639.4072265625)
    z = torch.tensor([0.0625 - 20.265625, 81 - 20.265625, -20.265625, -20.265625],
                     dtype=torch.float64) / sd
    heads = torch.stack([z[:2].mean(), z[2:].mean()])
    torch.testing.assert_close(FluctuationScore()(HAND_W, stat, 2), heads)
    assert float(heads[0]) == pytest.approx(0.500514, abs=1e-6)  # averaging the heads
    # first and standardising the two means would give +-0.7071 instead


def test_global_allocation_hits_target_within_one_structure():
    gen = torch.Generator().manual_seed(0)
    layers = [LayerScores(b, k, torch.rand(n, generator=gen), p)
              for b in range(3) for k, n, p in (("attention", 4, 4096), ("mlp", 100, 96))]
    total = sum(len(ls.scores) * ls.params_each for ls in layers)
    for ratio in (0.1, 0.2, 0.3, 0.5):
        removal = GlobalAllocation()(layers, ratio)
        removed = sum(len(removal[(ls.block, ls.kind)]) * ls.params_each for ls in layers)
        assert 0 <= ratio * total - removed < 96
        assert all(len(removal[(ls.block, ls.kind)]) < len(ls.scores) for ls in layers)
    uniform = UniformAllocation()(layers, 0.5)
    assert all(len(uniform[(b, "attention")]) == 2 for b in range(3))


# -- the stage on a GQA LLaMA ------------------------------------------------------------------

class _Data:
    def __init__(self, tokens):
        self.tokens = tokens

    def split(self, name):
        return self.tokens


def _model():
    torch.manual_seed(0)
    return TinyLlama(**SOURCE).build(DataSpec("text", vocab_size=VOCAB)).eval()


def _ctx(model, tmp_path):
    tokens = torch.randint(0, VOCAB, (24, 16), generator=torch.Generator().manual_seed(0))
    return RunContext(cfg=OmegaConf.create({}), run_dir=tmp_path, adapter=adapter_for(model),
                      data=_Data(tokens))


def _stage(criterion, ratio=0.3, compensate=False, allocator=None):
    stage = StructuredPruneStage(ratio, criterion, allocator or GlobalAllocation(),
                                 OBSCompensation(0.01), compensate=compensate,
                                 calibration={"num_samples": 24, "batch_size": 8},
                                 latency_repeats=1)
    stage.name = "prune"
    return stage


def _removed_structures(pruned, dense, adapter):
    """Which groups/channels of the dense model survived, found by matching weights."""
    masks = []
    for bp, bd in zip(adapter.blocks(pruned), adapter.blocks(dense)):
        for make in LAYOUTS.values():
            lp, ld = make(adapter, bp), make(adapter, bd)
            size = ld["group_size"]
            dense_cols = ld["consumer"].weight.data.T.reshape(ld["count"], -1)
            kept_cols = lp["consumer"].weight.data.T.reshape(lp["count"], -1)
            keep = torch.zeros(ld["count"], dtype=torch.bool)
            for row in kept_cols:
                keep |= (dense_cols == row).all(1)
            masks.append((ld["consumer"], keep.repeat_interleave(size)))
    return masks


@pytest.mark.parametrize("criterion", [NumericalScore(0.3), WandaScore(), FluctuationScore()],
                         ids=["numerical", "wanda", "flap"])
def test_pruned_model_equals_masked_dense_model(criterion, tmp_path):
    dense = _model()
    model = _model()
    ctx = _ctx(model, tmp_path)
    adapter = ctx.adapter
    pruned = _stage(criterion).run(model, ctx)
    # physically smaller: GQA groups (2 query heads + their k/v head) and channels removed
    heads = [adapter.attention_groups(b) for b in adapter.blocks(pruned)]
    assert all(per_group == 2 and hd == 8 for _, per_group, hd in heads)
    assert prunable_params(adapter, pruned) < prunable_params(adapter, dense)
    for consumer, keep in _removed_structures(pruned, dense, adapter):
        consumer.weight.data[:, ~keep] = 0
    batch = torch.randint(0, VOCAB, (3, 16))
    torch.testing.assert_close(adapter.logits(pruned, batch), adapter.logits(dense, batch),
                               rtol=1e-5, atol=1e-5)


def test_achieved_ratio_and_save_load_round_trip(tmp_path):
    model = _model()
    ctx = _ctx(model, tmp_path)
    adapter = ctx.adapter
    blocks = adapter.blocks(model)
    smallest = min(params_per_structure(make(adapter, b)) for b in blocks
                   for make in LAYOUTS.values())
    dense_prunable = prunable_params(adapter, model)
    pruned = _stage(NumericalScore(0.3), compensate=True).run(model, ctx)
    removed = dense_prunable - prunable_params(adapter, pruned)
    assert 0 <= 0.3 * dense_prunable - removed < smallest
    assert ctx.metrics["prune/params_ratio"] == pytest.approx(removed / dense_prunable)
    o_entries = [e for n, e in ctx.plan.items() if n.endswith("o_proj")]
    assert all(e["kind"] == "pruned_linear" and e["heads"] == 2 * e["kv_heads"]
               for e in o_entries)
    plan = {"model": {"source": {"_target_": "compresslab.models.sources.TinyLlama", **SOURCE}},
            "data_spec": {"modality": "text", "vocab_size": VOCAB}, "layers": ctx.plan}
    save_compressed(pruned, tmp_path / "compressed", plan)
    loaded = load_compressed(tmp_path / "compressed")
    batch = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(adapter.logits(loaded, batch), adapter.logits(pruned, batch),
                               rtol=0, atol=0)


def test_compensation_lowers_block_error(tmp_path):
    dense = _model()
    errors = {}
    for compensate in (False, True):
        model = _model()
        ctx = _ctx(model, tmp_path)
        _stage(NumericalScore(0.3), compensate=compensate).run(model, ctx)
        batch = ctx.data.tokens
        errors[compensate] = (ctx.adapter.logits(model, batch)
                              - ctx.adapter.logits(dense, batch)).norm()
    assert errors[True] < errors[False]


def test_bad_settings_fail_before_work(tmp_path):
    from compresslab.errors import ConfigError

    model = _model()
    ctx = _ctx(model, tmp_path)
    with pytest.raises(ConfigError, match="ratio must lie strictly between 0 and 1"):
        _stage(MagnitudeScore(), ratio=1.2).check(model, ctx)
    vit = _vit()
    vctx = _vit_ctx(vit, tmp_path)
    _stage(MagnitudeScore()).check(vit, vctx)       # fused qkv: described by the adapter
    with pytest.raises(ConfigError, match="seq_len crops text sequences"):
        stage = _stage(MagnitudeScore())
        stage.calibration.seq_len = 4
        stage.check(vit, vctx)
    # a norm over all heads' outputs would need slicing too: not described, refused
    from timm.models.vision_transformer import VisionTransformer

    normed = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                               embed_dim=32, depth=1, num_heads=4, scale_attn_norm=True)
    with pytest.raises(ConfigError, match="needs q/k/v/o projections"):
        _stage(MagnitudeScore()).check(normed, vctx)


def test_run_numerical_pruning_end_to_end(shared_root, tmp_path):
    from compresslab.pipeline import run

    run_dir = tmp_path / "run"
    cfg = compose_cfg([*TINY_LLAMA, "method=numerical_pruning", "method.ratio=0.3",
                       "method.num_samples=32"], shared_root, run_dir)
    metrics = run(cfg)
    assert metrics == read_metrics(run_dir)
    assert metrics["params/compressed"] < metrics["params/dense"]
    assert 0.25 < metrics["prune/params_ratio"] <= 0.3
    for key in ("test/ppl", "dense/test_ppl", "prune/latency_ms", "prune/latency_dense_ms"):
        assert key in metrics
    loaded = load_compressed(run_dir / "compressed")
    assert sum(p.numel() for p in loaded.parameters()) == metrics["params/compressed"]


def test_align_kept_moves_mlp_widths_to_the_nearest_multiple():
    from compresslab.compress.structured_pruning import LayerScores, align_kept

    scores = torch.arange(20, dtype=torch.float32)          # channel j scores j
    mlp, attn = LayerScores(0, "mlp", scores, 3), LayerScores(0, "attention", scores, 9)
    # 15 kept -> 16: the best-scored removed channel comes back
    got = align_kept([mlp, attn], {(0, "mlp"): [0, 1, 2, 3, 9], (0, "attention"): [5]}, 8)
    assert got[(0, "mlp")] == [0, 1, 2, 3] and got[(0, "attention")] == [5]
    # 17 kept -> 16: the worst-scored kept channel goes too
    assert align_kept([mlp], {(0, "mlp"): [4, 7, 9]}, 8)[(0, "mlp")] == [0, 4, 7, 9]
    # 3 kept -> at least 8; 1: unchanged
    assert len(align_kept([mlp], {(0, "mlp"): list(range(17))}, 8)[(0, "mlp")]) == 12
    assert align_kept([mlp], {(0, "mlp"): [4]}, 1) == {(0, "mlp"): [4]}


# -- the stage on a timm ViT (fused qkv) --------------------------------------------------------

VIT_SOURCE = dict(embed_dim=32, depth=2, num_heads=4)
VIT_SPEC = dict(modality="image", num_classes=10, image_size=8, channels=1)


def _vit():
    torch.manual_seed(0)
    return TinyViT(**VIT_SOURCE).build(DataSpec(**VIT_SPEC)).eval()


def _vit_ctx(model, tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (24,), generator=gen)
    return RunContext(cfg=OmegaConf.create({}), run_dir=tmp_path, adapter=adapter_for(model),
                      data=_Data(torch.utils.data.TensorDataset(images, labels)))


def _vit_images(n=3):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _check_vit_heads(model):
    for block in model.blocks:
        a = block.attn
        assert a.num_heads == a.qkv.out_features // (3 * a.head_dim)
        assert a.attn_dim == a.num_heads * a.head_dim == a.proj.in_features


def test_vit_magnitude_pruning_reaches_ratio_and_sets_heads(tmp_path):
    model = _vit()
    ctx = _vit_ctx(model, tmp_path)
    dense_prunable = prunable_params(ctx.adapter, model)
    pruned = _stage(MagnitudeScore(), allocator=UniformAllocation()).run(model, ctx)
    _check_vit_heads(pruned)
    assert all(b.attn.num_heads == 3 for b in pruned.blocks)     # round(0.3 * 4) removed
    removed = dense_prunable - prunable_params(ctx.adapter, pruned)
    assert ctx.metrics["prune/params_ratio"] == pytest.approx(removed / dense_prunable)
    assert ctx.metrics["prune/params_ratio"] == pytest.approx(0.3, abs=0.01)
    assert ctx.metrics["prune/heads_layer0"] == 3
    logits = ctx.adapter.logits(pruned, _vit_images())
    assert logits.shape == (3, 10) and bool(torch.isfinite(logits).all())
    assert {n for n in ctx.plan if ".attn." in n} == {f"blocks.{i}.attn.{p}" for i in (0, 1)
                                                      for p in ("qkv", "proj")}


def test_vit_pruning_removes_exactly_the_zeroed_heads_and_channels(tmp_path):
    """Heads/channels whose consumer columns are zero score lowest (magnitude) and are
    removed; the pruned model equals the dense one and keeps exactly the expected q/k/v rows
    of the fused qkv (row offsets right to the last index)."""
    dense = _vit()
    heads = {0: [1, 3], 1: [0, 3]}                  # head 3: the last rows of each part
    hd, width = 8, 32
    for i, block in enumerate(dense.blocks):
        for h in heads[i]:
            block.attn.proj.weight.data[:, h * hd:(h + 1) * hd] = 0
        block.mlp.fc2.weight.data[:, 40:] = 0       # 88 of 128 channels: more than removed
    model = _vit()
    model.load_state_dict(dense.state_dict())
    ctx = _vit_ctx(model, tmp_path)
    pruned = _stage(MagnitudeScore(), ratio=0.5, allocator=UniformAllocation()).run(model, ctx)
    _check_vit_heads(pruned)
    for i, (bp, bd) in enumerate(zip(pruned.blocks, dense.blocks)):
        kept = [h for h in range(4) if h not in heads[i]]
        rows = [part * width + h * hd + j for part in range(3) for h in kept for j in range(hd)]
        assert torch.equal(bp.attn.qkv.weight, bd.attn.qkv.weight[rows])
        assert torch.equal(bp.attn.qkv.bias, bd.attn.qkv.bias[rows])
        assert 40 <= bp.mlp.fc1.out_features < 128
        assert torch.equal(bp.mlp.fc1.weight[:40], bd.mlp.fc1.weight[:40])
    images = _vit_images()
    torch.testing.assert_close(ctx.adapter.logits(pruned, images),
                               ctx.adapter.logits(dense, images), rtol=1e-5, atol=1e-5)


def test_vit_pruned_model_reloads_from_its_plan(tmp_path):
    model = _vit()
    ctx = _vit_ctx(model, tmp_path)
    pruned = _stage(NumericalScore(0.3), compensate=True).run(model, ctx)
    proj = [e for n, e in ctx.plan.items() if n.endswith("attn.proj")]
    assert all(e["heads"] == e["kv_heads"] == e["in_features"] // 8 for e in proj)
    plan = {"model": {"source": {"_target_": "compresslab.models.sources.TinyViT",
                                 **VIT_SOURCE}},
            "data_spec": VIT_SPEC, "layers": ctx.plan}
    save_compressed(pruned, tmp_path / "compressed", plan)
    loaded = load_compressed(tmp_path / "compressed")
    _check_vit_heads(loaded)
    assert [b.attn.num_heads for b in loaded.blocks] == [b.attn.num_heads for b in pruned.blocks]
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}
    images = _vit_images()
    torch.testing.assert_close(ctx.adapter.logits(loaded, images),
                               ctx.adapter.logits(pruned, images), rtol=0, atol=0)


def test_run_numerical_pruning_on_vit_end_to_end(shared_root, tmp_path):
    from compresslab.pipeline import run

    run_dir = tmp_path / "run"
    cfg = compose_cfg([*TINY_VIT, "method=numerical_pruning", "method.ratio=0.3",
                       "method.num_samples=32", "method.stages.prune.latency_repeats=1",
                       "method.stages.prune.latency_samples=16"], shared_root, run_dir)
    metrics = run(cfg)
    assert metrics["params/compressed"] < metrics["params/dense"]
    assert 0.25 < metrics["prune/params_ratio"] <= 0.3
    assert "test/acc" in metrics and "prune/latency_ms" in metrics
    loaded = load_compressed(run_dir / "compressed")
    assert sum(p.numel() for p in loaded.parameters()) == metrics["params/compressed"]
    assert all(bool(torch.isfinite(p).all()) for p in loaded.parameters())
    _check_vit_heads(loaded)


class _HeadMeansStandardised(FluctuationScore):
    """The former order: head means of the raw fluctuation, standardised among heads."""

    def __call__(self, weight, inputs, group_size):
        from compresslab.compress.structured_pruning import group_reduce, standardized

        channel = inputs.variance * weight.double().pow(2).sum(0)
        return standardized(group_reduce(channel, group_size, "mean"))


def test_flap_reference_order_keeps_heads_competitive_with_channels(tmp_path):
    """Standardising a layer's few head means spreads them over +-1 std, so the global
    allocation removes heads far more often than the reference order does (a random
    4-layer, 4-head LLaMA at ratio 0.3: 1 head of 16 against 5)."""
    removed = {}
    for name, criterion in (("reference", FluctuationScore()),
                            ("head means", _HeadMeansStandardised())):
        torch.manual_seed(0)
        model = TinyLlama(hidden_size=64, num_layers=4, num_heads=4,
                          intermediate_size=176).build(DataSpec("text", vocab_size=100)).eval()
        tokens = torch.randint(0, 100, (32, 32), generator=torch.Generator().manual_seed(0))
        ctx = RunContext(cfg=OmegaConf.create({}), run_dir=tmp_path,
                         adapter=adapter_for(model), data=_Data(tokens))
        stage = StructuredPruneStage(0.3, criterion, GlobalAllocation(),
                                     calibration={"num_samples": 32, "batch_size": 8},
                                     latency_repeats=0)
        stage.name = "prune"
        stage.run(model, ctx)
        removed[name] = 16 - sum(ctx.adapter.attention_groups(b)[0]
                                 for b in ctx.adapter.blocks(model))
    assert removed["reference"] + 3 <= removed["head means"], removed   # 1 and 5 here


def test_layer_inputs_collect_only_what_the_criterion_and_compensator_read():
    from compresslab.compress.structured_pruning import (
        BiasCompensation,
        MagnitudeScore,
        NumericalScore,
        OBSCompensation,
        WandaScore,
        layer_inputs_for,
    )

    x = torch.randn(5, 3, dtype=torch.float64)
    numerical = layer_inputs_for(NumericalScore(0.2), OBSCompensation())()
    numerical.update(x)
    torch.testing.assert_close(numerical.gram, x.T @ x)
    assert numerical.sum is None                               # no moments were computed
    wanda = layer_inputs_for(WandaScore(), BiasCompensation())()
    wanda.update(x)
    torch.testing.assert_close(wanda.l2_norm, x.pow(2).sum(0).sqrt())
    with pytest.raises(RuntimeError, match="without the Gram"):
        _ = wanda.gram
    assert layer_inputs_for(MagnitudeScore(), None)().moments is False
