"""Deep-linear-network part of ``make bench``: the cost of one gradient step and the
wall-clock speed-up of the compressed network (docs/bench.md, docs/dln.md).

- ``step_costs``: ms per plain-GD step of a depth-3 network on matrix completion
  (d=100, r=5, p=0.3) at hidden widths 10, 20 and 100 (100 is the original network,
  10 = 2r the compressed one), for the project's closed-form step and for the autograd
  step it replaced, interleaved rounds in this process, medians.
- ``speedups``: the runs themselves (``run.py``, one process each, ``threads=1``):
  completion (the experiment's settings: lr 10, alpha 5, stop at train loss 1e-12) and
  factorization (lr 20, stop at train loss 1e-10 = recovery half-MSE 1e-10), original
  vs compressed; the speed-up is the ratio of GD seconds to the stop (``train/gd_time_s``)
  and, beside it, of the training stage's whole wall time (recording included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
WIDTHS = (10, 20, 100)
PROBLEMS = {
    "completion": ["experiment=dln_completion"],
    "factorization": ["experiment=dln_factorization", "method.stages.train.optim.lr=20",
                      "method.stages.train.max_steps=15000",
                      "method.stages.train.stop_loss=1e-10"],
}


def steppers(width: int, batch: dict) -> dict:
    """The closed-form and the autograd stepper on the same initial network."""
    from compresslab.compress import dln_gd
    from compresslab.data.matrix_recovery import MatrixCompletionDataModule
    from compresslab.models.architecture import adapter_for
    from compresslab.models.deep_linear import DeepLinearNetwork

    out = {}
    lrs = [10.0] * 3
    for kind in ("closed_form", "autograd"):
        torch.manual_seed(0)
        d = len(batch["target"])
        net = DeepLinearNetwork([d, width, width, d])
        weights = [layer.weight for layer in net.layers]
        out[kind] = (dln_gd.ProductGD(weights, lrs, batch) if kind == "closed_form" else
                     dln_gd.AutogradGD(net, adapter_for(net), MatrixCompletionDataModule().task,
                                       weights, lrs, batch))
    return out


def step_costs(steps: int = 1000, rounds: int = 5, log=print) -> dict:
    """ms per GD step (forward + update) by width and kind, median of ``rounds``."""
    from compresslab.data.matrix_recovery import MatrixCompletionDataModule
    from compresslab.metrics.speed import median

    batch = MatrixCompletionDataModule(d=100, r=5, p=0.3).make_batch()
    result = {}
    for width in WIDTHS:
        fns = steppers(width, batch)
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for kind, stepper in fns.items():
                start = time.perf_counter()
                for _ in range(steps):
                    stepper.forward()
                    stepper.update()
                samples[kind].append(1e3 * (time.perf_counter() - start) / steps)
        result[str(width)] = {k: median(v) for k, v in samples.items()}
        log(f"  dln width {width}: " + ", ".join(f"{k} {v:.3f} ms/step"
                                                  for k, v in result[str(width)].items()))
    return result


def run_dln(folder: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "run.py"), *overrides, f"hydra.run.dir={folder}",
           "progress=false", "print_table=false", "logger=none", "threads=1"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "WANDB_MODE": "disabled"})
    return json.loads((folder / "metrics.json").read_text())


def speedups(runs: Path, log=print) -> dict:
    """Original vs compressed on each problem: steps, GD seconds and stage wall time to
    the stopping rule, and their ratios."""
    out = {}
    for problem, overrides in PROBLEMS.items():
        rows = {}
        for net in ("original", "compressed"):
            m = run_dln(runs / f"{problem}-{net}", [*overrides, f"method=dln_{net}"])
            rows[net] = {"steps": m["train/steps"], "gd_s": m["train/gd_time_s"],
                         "ms_per_step": m["train/ms_per_step"], "stage_s": m["train/time_s"],
                         "final_loss": m["train/final_loss"]}
        orig, comp = rows["original"], rows["compressed"]
        out[problem] = {**rows, "gd_speedup": orig["gd_s"] / comp["gd_s"],
                        "stage_speedup": orig["stage_s"] / comp["stage_s"],
                        "steps_ratio": orig["steps"] / comp["steps"]}
        log(f"  dln {problem}: GD {orig['gd_s']:.2f} s / {comp['gd_s']:.3f} s = "
            f"{out[problem]['gd_speedup']:.1f}x ({orig['steps']} / {comp['steps']} steps), "
            f"stage wall {out[problem]['stage_speedup']:.1f}x")
    return out


# the authors' JAX code on this machine (issue 18: 50 steps per compiled call, 1 thread)
AUTHORS_MS = {"10": 0.175, "20": 0.131, "100": 1.07}
AUTHORS_SPEEDUP = {"completion": 13.7, "factorization": 5.8}


def tables(dln: dict) -> str:
    from compresslab.report import markdown_table

    parts = []
    if dln.get("steps"):
        body = [[w, f"{c['closed_form']:.3f}", f"{c['autograd']:.3f}",
                 f"{c['autograd'] / c['closed_form']:.1f}x", AUTHORS_MS.get(w, "-")]
                for w, c in dln["steps"].items()]
        parts.append("ms per GD step, depth 3, completion d=100 r=5 p=0.3, float64, 1 thread:"
                     "\n\n" + markdown_table(["width", "closed form (default)", "autograd",
                                              "gain", "authors' JAX (issue 18)"], body))
    if dln.get("speedups"):
        body = []
        for problem, r in dln["speedups"].items():
            o, c = r["original"], r["compressed"]
            body.append([problem, f"{o['steps']} / {c['steps']}",
                         f"{o['gd_s']:.2f} / {c['gd_s']:.3f}", f"{r['gd_speedup']:.1f}x",
                         f"{o['stage_s']:.1f} / {c['stage_s']:.2f}",
                         f"{r['stage_speedup']:.1f}x", f"{AUTHORS_SPEEDUP[problem]}x"])
        parts.append("Original vs compressed to the same stopping rule (see "
                     "experiments/bench/dln_bench.py):\n\n" + markdown_table(
                         ["problem", "steps", "GD s", "GD speed-up", "stage wall s",
                          "stage speed-up", "authors' speed-up"], body))
    return "\n\n".join(parts)
