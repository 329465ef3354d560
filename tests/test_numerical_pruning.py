"""Numerical pruning and its baselines: exact facts of the algorithms, physical pruning."""

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
from compresslab.models.adapters import adapter_for
from compresslab.models.sources import DataSpec, TinyLlama
from compresslab.stages.base import RunContext
from compresslab.stages.prune import (
    LAYOUTS,
    StructuredPruneStage,
    params_per_structure,
    prunable_params,
)
from conftest import TINY_LLAMA, compose_cfg, read_metrics

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


def test_criteria_match_their_formulas():
    x, weight = _toy_layer(d_in=6)
    stat = _inputs(x)
    torch.testing.assert_close(MagnitudeScore()(weight, stat, 2),
                               weight.reshape(7, 3, 2).pow(2).sum((0, 2)).sqrt())
    wanda = weight.abs().mean(0) * x.norm(dim=0)
    torch.testing.assert_close(WandaScore()(weight, stat, 1), wanda)
    flap = x.var(0, unbiased=False) * weight.pow(2).sum(0)
    torch.testing.assert_close(FluctuationScore()(weight, stat, 3), flap.reshape(2, 3).mean(1))


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
                                 OBSCompensation(0.01), compensate=compensate, num_samples=24,
                                 batch_size=8, latency_repeats=1)
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
    from compresslab.models.sources import TinyViT

    model = _model()
    ctx = _ctx(model, tmp_path)
    with pytest.raises(ConfigError, match="ratio must lie strictly between 0 and 1"):
        _stage(MagnitudeScore(), ratio=1.2).check(model, ctx)
    vit = TinyViT(embed_dim=32, depth=1).build(DataSpec("image", num_classes=10, image_size=8,
                                                        channels=1))
    vctx = RunContext(cfg=ctx.cfg, run_dir=tmp_path, adapter=adapter_for(vit), data=ctx.data)
    with pytest.raises(ConfigError, match="needs separate q/k/v/o"):
        _stage(MagnitudeScore()).check(vit, vctx)


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
