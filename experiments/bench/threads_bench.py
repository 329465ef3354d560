"""Thread part of ``make bench``: one training step (forward, backward, AdamW) of each
benchmarked model with 1 torch thread and with every core, interleaved rounds, medians.
It is the measurement behind ``threads: null`` (compresslab.threads): one thread for
models under 20M parameters."""

from __future__ import annotations

import os
import time

import torch


def train_step_fn(bm, batch: int):
    from compresslab.models.architecture import adapter_for

    model = bm.build().train()
    adapter = adapter_for(model)
    inputs = bm.batch(batch)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def step():
        adapter.logits(model, inputs).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, step


def thread_costs(models: dict, rounds: int = 3, log=print) -> dict:
    """name -> {params, batch, ms per step at 1 thread and at all cores, ratio}."""
    from compresslab.metrics.speed import median, param_count

    cores = os.cpu_count() or 1
    before = torch.get_num_threads()
    out = {}
    for name, bm in models.items():
        batch = bm.throughput_batch
        model, step = train_step_fn(bm, batch)
        step()                                       # allocations, first-call costs
        reps = max(1, int(0.5 / max(1e-4, timed_once(step))))
        samples: dict[int, list[float]] = {1: [], cores: []}
        for _ in range(rounds):
            for threads in samples:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                for _ in range(reps):
                    step()
                samples[threads].append(1e3 * (time.perf_counter() - start) / reps)
        ms = {t: median(v) for t, v in samples.items()}
        out[name] = {"params": param_count(model), "batch": batch, "cores": cores,
                     "ms_1_thread": ms[1], "ms_all_cores": ms[cores],
                     "all_cores_over_1": ms[cores] / ms[1]}
        log(f"  threads {name}: 1 thread {ms[1]:.1f} ms/step, {cores} threads "
            f"{ms[cores]:.1f} ms/step")
    torch.set_num_threads(before)
    return out


def timed_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(costs: dict) -> str:
    from compresslab.report import markdown_table

    body = [[name, f"{c['params'] / 1e6:.3g}M", c["batch"], f"{c['ms_1_thread']:.1f}",
             f"{c['ms_all_cores']:.1f} ({c['cores']})", f"{c['all_cores_over_1']:.2f}"]
            for name, c in costs.items()]
    return ("One training step (forward, backward, AdamW) at the throughput batch, "
            "interleaved rounds, medians; the load of the machine during the run decides "
            "much of the all-cores column:\n\n" + markdown_table(
                ["model", "params", "batch", "1 thread ms", "all cores ms (threads)",
                 "all cores / 1 thread"], body))
