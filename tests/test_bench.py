"""The benchmark's pure helpers: FLOP counts against hand counts, medians and paired
ratios, interleaving order, activation memory, and the bench table (no timed assertions)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresslab.data.spec import DataSpec
from compresslab.layers.lowrank import LowRankLinear
from compresslab.metrics.speed import (
    TensorMemory,
    attention_flops,
    calls_for,
    count_flops,
    interleaved_times,
    linear_flops,
    median,
    paired_speedup,
    param_bytes,
    param_count,
    ratio,
)
from compresslab.models.llama import TinyLlama
from conftest import load_script


def test_flops_of_linears_match_the_hand_count():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), LowRankLinear(16, 4, rank=2))
    x = torch.randn(5, 8)
    hand = 2 * 5 * (8 * 16) + 2 * 5 * (16 * 2) + 2 * 5 * (2 * 4)
    assert linear_flops(net, tokens=5) == hand
    assert count_flops(lambda: net(x)) == hand
    # a rank-r factorisation of an (out x in) layer costs r (in + out) / (in out) of it
    assert linear_flops(LowRankLinear(30, 20, 6), 1) / linear_flops(nn.Linear(30, 20), 1) == \
        pytest.approx(6 * 50 / 600)


def test_attention_flops_counted_on_cpu():
    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    assert attention_flops(2, 3, 7, 7, 4) == 4 * 2 * 3 * 7 * 7 * 4
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) == \
        attention_flops(2, 3, 7, 7, 4)


def test_llama_flops_are_linears_plus_attention():
    model = TinyLlama(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48).build(
        DataSpec("text", vocab_size=50)).eval()
    ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        counted = count_flops(lambda: model(input_ids=ids, use_cache=False))
    hand = linear_flops(model, 3 * 9) + 2 * attention_flops(3, 4, 9, 9, 8)
    assert counted == hand


def test_median_and_paired_speedup():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        median([])
    # per-round ratios 2, 2, 4 -> 2 (a round where the machine was slow for both cancels)
    assert paired_speedup([2.0, 4.0, 8.0], [1.0, 2.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        paired_speedup([1.0], [1.0, 2.0])
    assert ratio(6, 3) == 2 and ratio(1, 0) == math.inf
    assert calls_for(0.01, 0.25) == 25 and calls_for(1.0, 0.25) == 1 and calls_for(0, 1) == 1000


def test_interleaved_times_rotate_and_divide_by_calls():
    order, clock = [], [0.0]

    def fn(name, cost):
        def run():
            order.append(name)
            clock[0] += cost
        return run

    times = interleaved_times({"a": fn("a", 1.0), "b": fn("b", 3.0)}, repeats=3,
                              calls={"a": 2, "b": 1}, warmup=1, clock=lambda: clock[0],
                              cpu_clock=lambda: clock[0] / 2)
    assert order == ["a", "b", "a", "a", "b", "b", "a", "a", "a", "a", "b"]
    assert times["a"]["wall"] == [1.0] * 3 and times["b"]["wall"] == [3.0] * 3
    assert times["b"]["cpu"] == [1.5] * 3


def test_tensor_memory_counts_activations_not_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
    x = torch.randn(10, 64)
    with torch.no_grad(), TensorMemory() as mem:
        y = net(x)
    # alive together at the peak: the first linear's output and the GELU's (4 bytes each)
    assert mem.peak == 2 * 10 * 256 * 4
    assert mem.current == y.numel() * 4
    del y
    assert mem.current == 0
    assert param_bytes(net) == 4 * param_count(net) == 4 * (64 * 256 + 256 + 256 * 32 + 32)


def _bench_module():
    return load_script("experiments/bench/bench.py", "bench")


def test_bench_table_renders_ratios(tmp_path):
    bench = _bench_module()
    timing = {"wall_s": 0.5, "cpu_s": 0.5, "rate": 100.0, "speedup": 1.0, "cpu_speedup": 1.0}
    row = {"params": 2_000_000, "achieved_ratio": 0.0, "flop_limit": 1.0, "peak_bytes": 2**21,
           "memory_ratio": 1.0, "latency": timing, "throughput": timing, "generate": timing}
    fast = {**timing, "speedup": 1.75, "cpu_speedup": 1.8}
    low = {**row, "achieved_ratio": 0.5, "flop_limit": 1.9, "throughput": fast}
    results = {"env": {"threads": 1}, "models": {"llama_x": {"hidden_size": 8}},
               "speed": {"llama_x": {"dense": row, "lowrank r0.5": low}},
               "cost": [{"model": "llama_x", "method": "svd_llm", "stage": "compress",
                         "threads": 1, "time_s": 2.0, "cpu_s": 1.5,
                         "peak_rss_bytes": 3 * 2**30, "model_bytes": 2**30,
                         "rss_start_bytes": 2**29, "params_ratio": 0.4, "forward_s": 0.5,
                         "linalg_s": 0.5, "floor_s": 1.0, "floor_cpu_s": 0.5}]}
    text = bench.render(results, tmp_path).read_text()
    assert "| lowrank r0.5 | 2M | 0.500 | 1.90x |" in text
    assert "1.75x | 1.80x" in text
    assert "| llama_x | svd_llm (compress) | 1 | 2.0 | 1.5 | 1.0 (0.5 + 0.5) | 2.00x | 0.5 | " \
        "3.00x | - | 3.00 | 1 | 3.00 | 0.50 | 2.50 | - | 0.400 |" in text


def test_shared_svd_equals_plain_svd_at_every_rank():
    from compresslab.compress.decomposer import PlainSVD

    bench = _bench_module()
    w = torch.randn(12, 9)
    shared = bench.SharedSVD()
    for rank in (1, 4, 9):
        got = shared(w, rank, "w")
        want = PlainSVD()(w, rank, "w")
        torch.testing.assert_close(got[0] @ got[1], want[0] @ want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama_tiny", "vit_tiny"])
def test_bench_builds_every_compressed_form_of_each_model(name):
    bench = _bench_module()
    bm = bench.bench_models()[name]
    forms = bench.variants(bm, bm.build(), (8, 0.015), lambda msg: None)
    pruned = [n for n in forms if n.startswith("pruned")]
    assert len(pruned) == 2 * len(bench.PRUNE_RATIOS)
    batch = bm.batch(2)
    for form, (model, info) in forms.items():
        assert model(batch) is not None, form
        if form.startswith("pruned"):
            assert abs(info["achieved_ratio"] - info["target_ratio"]) < 0.01, form
        if form.endswith("align_channels=8"):
            assert all(c % 8 == 0 for c in info["mlp_channels"]), form


def test_dln_step_costs_and_table():
    _bench_module()                                  # puts experiments/bench on the path
    import dln_bench

    costs = dln_bench.step_costs(steps=3, rounds=1, log=lambda msg: None)
    assert set(costs) == {"10", "20", "100"}
    assert all(c["closed_form"] > 0 and c["autograd"] > 0 for c in costs.values())
    run = {"steps": 100, "gd_s": 2.0, "ms_per_step": 20.0, "stage_s": 4.0, "final_loss": 1e-12}
    fast = {**run, "steps": 50, "gd_s": 0.1, "stage_s": 1.0}
    text = dln_bench.tables({"steps": {"10": {"closed_form": 0.1, "autograd": 0.5}},
                             "speedups": {"completion": {"original": run, "compressed": fast,
                                                         "gd_speedup": 20.0,
                                                         "stage_speedup": 4.0}}})
    assert "| 10 | 0.100 | 0.500 | 5.0x | 0.175 |" in text
    assert "| completion | 100 / 50 | 2.00 / 0.100 | 20.0x | 4.0 / 1.00 | 4.0x | 13.7x |" in text


@pytest.mark.parametrize("method", ["svd", "svd_llm", "numerical_pruning"])
def test_floor_times_the_forward_and_the_factorisations(method, monkeypatch):
    _bench_module()
    import floor

    from compresslab.models.architecture import adapter_for

    model = TinyLlama(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24).build(
        DataSpec("text", vocab_size=30)).eval()
    adapter = adapter_for(model)
    from compresslab.compress.calibration import CalibrationSettings

    stage = type("Stage", (), {"calibration": CalibrationSettings(num_samples=4, batch_size=2)})()
    factorised = []
    for name in ("svd", "cholesky"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name,
                            lambda a, *args, real=real, name=name, **kw:
                            factorised.append((name, tuple(a.shape))) or real(a, *args, **kw))
    out = floor.floor_seconds(method, stage, model, adapter, torch.randint(0, 30, (6, 5)))
    assert out["floor_s"] == pytest.approx(out["forward_s"] + out["linalg_s"])
    assert ("gram_s" in out) == (method != "svd")
    assert (out["forward_s"] == 0) == (method == "svd")
    layers = list(adapter.compressible_linears(model).values())
    if method == "svd":
        assert factorised == [("svd", tuple(lin.weight.shape)) for lin in layers]
    elif method == "svd_llm":       # per weight: Cholesky of its in x in Gram, SVD of W L
        assert factorised == [x for lin in layers for x in (
            ("cholesky", (lin.in_features,) * 2), ("svd", tuple(lin.weight.shape)))]
    else:                           # two Cholesky factorisations per o_proj and down_proj
        assert [shape for _, shape in factorised] == [(16, 16)] * 2 + [(24, 24)] * 2 + \
            [(16, 16)] * 2 + [(24, 24)] * 2


def test_thread_table_reports_the_ratio():
    _bench_module()
    import threads_bench

    text = threads_bench.table({"llama_x": {"params": 1_330_000, "batch": 8, "cores": 2,
                                            "ms_1_thread": 400.0, "ms_all_cores": 800.0,
                                            "all_cores_over_1": 2.0}})
    assert "| llama_x | 1.33M | 8 | 400.0 | 800.0 (2) | 2.00 |" in text


def test_busy_machine_warning_only_when_the_load_reaches_the_cores(monkeypatch):
    import os

    from compresslab.metrics.speed import busy_machine_warning

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 0.0, 0.0))
    assert busy_machine_warning() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (3.25, 0.0, 0.0))
    assert busy_machine_warning().startswith("warning: load average 3.2 on 2 cores")
