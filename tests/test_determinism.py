"""Same config and seed, same metrics.json on CPU: one method of each family, run twice.

Keys that measure time (wall clock, CPU) or whether the base model came from the cache are
left out by :func:`compresslab.resume.reproducible_metrics` (the documented rule); every
other key must be equal, bit for bit.
"""

import pytest

from compresslab.pipeline import run
from compresslab.resume import NONDETERMINISTIC, reproducible_metrics
from conftest import TINY_LLAMA, compose_cfg, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = ["method.calibration.num_samples=16"]
FAMILIES = {
    "low_rank": [*TINY_LLAMA, "method=svd_llm", *CALIB],
    "pruning": [*TINY_LLAMA, "method=numerical_pruning", "method.num_samples=16",
                "method.stages.prune.latency_repeats=2", "method.stages.prune.latency_samples=4"],
    "trained": [*TINY_LLAMA, "method=pela", "method.stages.pretrain.max_steps=6",
                "method.stages.finetune.max_steps=4"],
    "spectrum": [*TINY_LLAMA, "method=spectrum", *CALIB, "method.stages.spectrum.max_steps=6",
                 "method.stages.spectrum.finetune_steps=4"],
    "dln": ["experiment=dln_factorization", "dataset.datamodule.d=12", "dataset.datamodule.r=2",
            "method.stages.train.max_steps=200", "model.source.init_scale=0.1",
            "method.stages.train.optim.lr=8"],
    "adapters": [*TINY_LLAMA, "method=lora", "method.stages.finetune.max_steps=6"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_config_and_seed_give_the_same_metrics(family, shared_root, tmp_path):
    args = [*FAMILIES[family], "checkpoint_every=3"]
    first = run(compose_cfg(args, shared_root, tmp_path / "a"))
    second = run(compose_cfg(args, shared_root, tmp_path / "b"))
    assert reproducible_metrics(first) == reproducible_metrics(second)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert reproducible_metrics(a) == reproducible_metrics(b)
    assert len(reproducible_metrics(a)) > 5
    dropped = set(a) - set(reproducible_metrics(a))
    # only timings, memory peaks (cost/*) and the cache flag are dropped
    assert all(k == "base/cached" or "time" in k or k.endswith("_ms") or "speedup" in k
               or k.startswith("cost/")
               or "seconds_to" in k or k.endswith("ms_per_step") or k.startswith("base_pretrain/")
               for k in dropped), dropped


def test_the_rule_names_exactly_the_timing_and_cache_keys():
    timing = ["time/total_s", "compress/time_s", "train/gd_time_s", "prune/latency_ms",
              "prune/cpu_dense_ms", "prune/speedup", "prune/cpu_speedup", "train/ms_per_step",
              "train/seconds_to_recovery_mse_1e-10", "base/cached", "base_pretrain/steps",
              "cost/stages_s", "cost/peak_rss_bytes", "cost/peak_rss_increase_bytes"]
    kept = ["test/ppl", "dense/test_ppl", "compress/params_ratio", "prune/heads_layer0",
            "train/steps_to_recovery_mse_1e-10", "train/learn_step_s0", "pretrain/steps",
            "spectrum/rank/model.layers.0.mlp.up_proj", "base/test/ppl", "finetune/val_loss"]
    assert all(NONDETERMINISTIC.search(k) for k in timing)
    assert not any(NONDETERMINISTIC.search(k) for k in kept)
