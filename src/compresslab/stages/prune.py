"""Structured pruning stage: numerical pruning and its baselines (docs/numerical_pruning.md).

Two block-by-block passes over the calibration samples:

1. **score** every attention group and MLP channel of every block from the inputs
   of o_proj / down_proj on the dense model, and let the allocator pick the
   structures to remove across all blocks (the global allocation needs every
   layer's scores before any layer changes);
2. **prune** block by block on the already-pruned model's activations: collect
   the consuming layer's input statistics, compensate it (group OBS or FLAP's
   bias), then physically delete the rows/columns of q/k/v/o and gate/up/down.

Grouped-query attention: a structure is a whole key/value group (the k/v head
and the query heads sharing it), so every block keeps the model's query heads
per key/value head and HF's attention needs no per-layer attribute change.
Fused projections (timm ViT's qkv): the adapter names the fused linear for each of
q, k and v with the offset of that part's rows; it is sliced once, keeping the kept
rows of every part, and :meth:`~ArchitectureAdapter.set_attention_heads` tells the
attention its new head count (also when the model is rebuilt from its plan).
Every layer keeps at least one group and one channel.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from compresslab.compress.calibration import BlockwiseCalibration, CalibrationSettings
from compresslab.compress.structured_pruning import (
    Allocator,
    Compensator,
    Criterion,
    LayerScores,
    align_kept,
    kept_channels,
    layer_inputs_for,
    removed_channels,
    sliced_linear,
)
from compresslab.errors import ConfigError, NumericalError
from compresslab.layers import PrunedLinear
from compresslab.metrics.speed import median, paired_speedup, timed_in_turns
from compresslab.models.architecture import ArchitectureAdapter
from compresslab.models.utils import count_params, set_module
from compresslab.stages.base import Stage

ATTENTION_ROLES = ("q", "k", "v", "o")


# -- what a structure is, per block ----------------------------------------------------------

def attention_layout(adapter: ArchitectureAdapter, block: nn.Module) -> dict[str, Any]:
    """Groups of the block's attention: rows per group of q/k/v (producers: ``(linear,
    rows per group, first row of the part)``, a fused qkv named thrice), columns per
    group of o."""
    groups, per_group, head_dim = adapter.attention_groups(block)
    parts = adapter.attention_projections(block)
    rows = {"q": per_group * head_dim, "k": head_dim, "v": head_dim}
    return {"count": groups, "group_size": per_group * head_dim, "heads_per_group": per_group,
            "producers": {r: (parts[r][0], n, parts[r][1]) for r, n in rows.items()},
            "consumer": parts["o"][0]}


def mlp_layout(adapter: ArchitectureAdapter, block: nn.Module) -> dict[str, Any]:
    lin = adapter.mlp_linears(block)
    down = lin["down"]
    return {"count": down.in_features, "group_size": 1,
            "producers": {r: (m, 1, 0) for r, m in lin.items() if r != "down"},
            "consumer": down}


LAYOUTS = {"attention": attention_layout, "mlp": mlp_layout}


def params_per_structure(layout: dict[str, Any]) -> int:
    produced = sum(n * (m.in_features + (m.bias is not None))
                   for m, n, _ in layout["producers"].values())
    return produced + layout["group_size"] * layout["consumer"].out_features


def prunable_params(adapter: ArchitectureAdapter, model: nn.Module) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for block in adapter.blocks(model)
               for m in adapter.block_linears(block).values())


def prune_structures(model: nn.Module, layout: dict[str, Any], removed: list[int],
                     names: dict[int, str]) -> dict[str, PrunedLinear]:
    """Physically delete ``removed`` structures; returns the new linears by name.

    A producer linear named by several parts (fused qkv) is sliced once: it keeps every
    row except the removed structures' rows of each part (rows of no part stay)."""
    entries = {}
    count, size = layout["count"], layout["group_size"]
    keep_rows: dict[int, tuple[nn.Linear, torch.Tensor]] = {}
    for linear, rows_each, offset in layout["producers"].values():
        mask = keep_rows.setdefault(
            id(linear), (linear, torch.ones(linear.out_features, dtype=torch.bool)))[1]
        mask[removed_channels(count, rows_each, removed) + offset] = False
    for linear, mask in keep_rows.values():
        entries[names[id(linear)]] = sliced_linear(linear, rows=mask.nonzero().flatten(),
                                                    cls=PrunedLinear)
    consumer = layout["consumer"]
    entries[names[id(consumer)]] = sliced_linear(
        consumer, cols=kept_channels(count, size, removed), cls=PrunedLinear)
    for name, new in entries.items():
        set_module(model, name, new)
    return entries


@torch.inference_mode()
def paired_latency(dense: nn.Module, pruned: nn.Module, adapter: ArchitectureAdapter,
                   batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Forward latency of the dense and the pruned model measured as ``make bench`` does:
    the two take turns in one process for ``rounds`` rounds, each sample long enough for
    the timer, and the speed-ups are medians of the per-round ratios, so the slowly changing
    load of a shared machine cancels out. CPU time is what the forward pass costs even when
    other processes share the cores (their load stretches wall-clock time only)."""
    for model in (dense, pruned):
        model.eval()
    times = timed_in_turns({"dense": lambda: adapter.logits(dense, batch),
                            "pruned": lambda: adapter.logits(pruned, batch)}, rounds, target_s=0.05)
    d, p = times["dense"], times["pruned"]
    return {"latency_dense_ms": 1000 * median(d["wall"]), "latency_ms": 1000 * median(p["wall"]),
            "speedup": paired_speedup(d["wall"], p["wall"]),
            "cpu_dense_ms": 1000 * median(d["cpu"]), "cpu_ms": 1000 * median(p["cpu"]),
            "cpu_speedup": paired_speedup(d["cpu"], p["cpu"])}


class StructuredPruneStage(Stage):
    """Remove attention groups and MLP channels to ``ratio`` of the prunable parameters.

    ``criterion`` scores structures, ``allocator`` picks which go, ``compensator``
    (null, or ``compensate=false``: none) updates o_proj/down_proj before their rows
    are deleted.
    ``calibration``: the samples every calibrated stage takes
    (:class:`~compresslab.compress.calibration.CalibrationSettings` or its options:
    ``num_samples`` training sequences, cropped to ``seq_len`` tokens when set, or images, in
    batches of ``batch_size``, drawn with ``seed``; default 128 in batches of 16). Latency: the
    pruned model and a copy of the dense one take turns on the first ``latency_samples``
    calibration sequences (one batch) for ``latency_repeats`` rounds; the speed-up is the
    median of the per-round ratios, as in ``make bench`` (``latency_repeats: 0``: not
    measured, no copy kept).
    ``align_channels``: every MLP keeps a multiple of this many channels (the nearest to
    the allocation; 1: as allocated), for faster matrix products (docs/bench.md).
    """

    def __init__(self, ratio: float, criterion: Criterion, allocator: Allocator,
                 compensator: Compensator | None = None, compensate: bool = True,
                 calibration: CalibrationSettings | dict | None = None,
                 latency_repeats: int = 10, latency_samples: int = 64,
                 align_channels: int = 1):
        self.ratio, self.criterion, self.allocator = ratio, criterion, allocator
        self.align_channels = align_channels
        self.compensator = compensator if compensate else None
        if not isinstance(calibration, CalibrationSettings):
            calibration = CalibrationSettings(**{"num_samples": 128, "batch_size": 16,
                                                 **dict(calibration or {})})
        self.calibration = calibration
        self.latency_repeats, self.latency_samples = latency_repeats, latency_samples

    def check(self, model, ctx):
        if not 0 < self.ratio < 1:
            raise ConfigError(f"stage {self.name}: ratio must lie strictly between 0 and 1, "
                              f"got {self.ratio}")
        self.calibration.check(ctx.data)   # the checks every calibrated stage shares
        if self.calibration.seq_len is not None and ctx.adapter.modality != "text":
            raise ConfigError(f"stage {self.name}: seq_len crops text sequences; set it to "
                              f"null for {ctx.adapter.modality} models")
        block = ctx.adapter.blocks(model)[0]
        roles = (set(ctx.adapter.attention_projections(block))
                 | set(ctx.adapter.mlp_linears(block)))
        try:
            ctx.adapter.attention_groups(block)
        except NotImplementedError:
            roles = set()
        if not set(ATTENTION_ROLES) | {"down"} <= roles:
            raise ConfigError(f"stage {self.name}: structured pruning needs q/k/v/o "
                              f"projections (separate or fused) with head counts and an MLP "
                              f"down linear; {type(ctx.adapter).__name__} does not provide "
                              f"them")

    def check_data(self, ctx):
        from compresslab.data.base import check_calibration_size

        if self.calibration.data is None:   # (another dataset was checked with the settings)
            check_calibration_size(ctx.data, self.calibration.num_samples, "method.num_samples")

    def run(self, model, ctx):
        start = time.perf_counter()
        adapter = ctx.adapter
        batches = self.calibration.batches(ctx.data)
        dense_params, dense_prunable = count_params(model), prunable_params(adapter, model)
        dense = copy.deepcopy(model) if self.latency_repeats else None
        layers = self._score(model, ctx, batches)
        removal = align_kept(layers, self.allocator(layers, self.ratio), self.align_channels)
        self._prune(model, ctx, batches, removal)
        pruned_prunable = prunable_params(adapter, model)
        reports = {**self.criterion.report(),
                   **(self.compensator.report() if self.compensator is not None else {})}
        ctx.log({f"{self.name}/params_ratio": 1 - pruned_prunable / dense_prunable,
                 f"{self.name}/model_params_ratio": 1 - count_params(model) / dense_params,
                 **self._structure_counts(model, adapter),
                 **{f"{self.name}/{k}": v for k, v in reports.items()}})
        if dense is not None:
            timed = torch.cat(batches)[:self.latency_samples]
            latency = paired_latency(dense, model, adapter, timed, self.latency_repeats)
            ctx.log({f"{self.name}/{k}": v for k, v in latency.items()})
        ctx.log({f"{self.name}/time_s": time.perf_counter() - start})
        return model

    def _score(self, model, ctx, batches) -> list[LayerScores]:
        adapter, layers = ctx.adapter, []
        walk = BlockwiseCalibration(model, adapter, batches)
        for index, block in walk:
            layouts = {kind: make(adapter, block) for kind, make in LAYOUTS.items()}
            # the score pass changes no block: its outputs feed the next block as they are
            inputs = walk.collect(block, {k: v["consumer"] for k, v in layouts.items()},
                                  layer_inputs_for(self.criterion), keep_outputs=True)
            for kind, lay in layouts.items():
                try:
                    scores = self.criterion(lay["consumer"].weight.data, inputs[kind],
                                            lay["group_size"]).float()
                    self._log_conditioning(ctx, "score", index, kind, self.criterion)
                    if not bool(torch.isfinite(scores).all()):
                        raise NumericalError("scores are not finite (NaN/Inf activations)")
                except NumericalError as exc:
                    raise NumericalError(f"stage {self.name}: scoring block {index} {kind}: "
                                         f"{exc}") from None
                layers.append(LayerScores(index, kind, scores, params_per_structure(lay)))
        return layers

    def _prune(self, model, ctx, batches, removal: dict[tuple[int, str], list[int]]) -> None:
        adapter = ctx.adapter
        walk = BlockwiseCalibration(model, adapter, batches)
        for index, block in walk:
            for kind, make in LAYOUTS.items():   # attention first: the MLP sees its output
                lay, removed = make(adapter, block), removal.get((index, kind), [])
                if not removed:
                    continue
                if self.compensator is not None:
                    inputs = walk.collect(block, {"c": lay["consumer"]},
                                          layer_inputs_for(self.compensator))["c"]
                    try:
                        self.compensator(lay["consumer"], inputs, removed_channels(
                            lay["count"], lay["group_size"], removed))
                        self._log_conditioning(ctx, "compensation", index, kind,
                                               self.compensator)
                        if not all(bool(torch.isfinite(p).all())
                                   for p in lay["consumer"].parameters()):
                            raise NumericalError("compensated weights are not finite")
                    except NumericalError as exc:
                        raise NumericalError(f"stage {self.name}: compensating block {index} "
                                             f"{kind}: {exc}") from None
                names = {id(m): n for n, m in model.named_modules()}
                pruned = prune_structures(model, lay, removed, names)
                kept = lay["count"] - len(removed)
                if kind == "attention":
                    adapter.set_attention_heads(block, kept, kept * lay["heads_per_group"])
                pruned[names[id(lay["consumer"])]].counts = (
                    {"kv_heads": kept, "heads": kept * lay["heads_per_group"]}
                    if kind == "attention" else {"channels": kept})
                ctx.plan.update({n: layer.plan_entry() for n, layer in pruned.items()})

    def _log_conditioning(self, ctx, solve: str, index: int, kind: str, solver) -> None:
        """Smallest eigenvalue and condition number of the matrix ``solver`` (criterion or
        compensator) last solved with, per block and kind, and the worst over blocks: an
        ill-posed solve shows where a score or an update is unreliable."""
        measured = getattr(solver, "last_conditioning", None)
        if not measured:
            return
        ctx.log({f"{self.name}/{solve}_{k}/block{index}_{kind}": v for k, v in measured.items()})
        worst = ctx.metrics.get(f"{self.name}/{solve}_cond_max", 0.0)
        ctx.log({f"{self.name}/{solve}_cond_max": max(worst, measured["cond"])})

    def _structure_counts(self, model, adapter) -> dict[str, int]:
        out = {}
        for i, block in enumerate(adapter.blocks(model)):
            groups, per_group, _ = adapter.attention_groups(block)
            out[f"{self.name}/heads_layer{i}"] = groups * per_group
            out[f"{self.name}/channels_layer{i}"] = mlp_layout(adapter, block)["count"]
        return out
