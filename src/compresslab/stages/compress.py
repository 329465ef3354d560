"""The low-rank compression stage: replace the adapter's linears by factors."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from compresslab.callbacks.progress import progress_enabled, track
from compresslab.compress.calibration import BlockwiseCalibration, CalibrationSettings
from compresslab.compress.decomposer import Decomposer
from compresslab.compress.ratio import lowrank_params, resolve_rank
from compresslab.data.base import model_inputs
from compresslab.errors import NumericalError
from compresslab.layers.lowrank import LowRankLinear
from compresslab.models.utils import count_params, set_module
from compresslab.stages.base import RunContext, Stage


def select_linears(model: nn.Module, ctx_adapter, roles: Sequence[str] | None,
                   omit: Sequence[str]) -> dict[str, nn.Module]:
    """Compressible linears of the model, limited to ``roles`` and without ``omit`` names."""
    names = {id(m): n for n, m in model.named_modules()}
    chosen = {}
    for block in ctx_adapter.blocks(model):
        for role, lin in ctx_adapter.block_linears(block).items():
            name = names[id(lin)]
            if roles is not None and role not in roles:
                continue
            if any(token in name for token in omit):
                continue
            chosen[name] = lin
    return chosen


class LowRankStage(Stage):
    """Replace each selected linear by a :class:`LowRankLinear` from ``decomposer``.

    ``ratio``: fraction of each layer's weights removed (rank from
    ``compress.ratio.rank_for_ratio``, rounded down to a multiple of ``round_to`` when
    that removes at most ``round_slack`` more of the layer; null: always); or an explicit
    ``rank`` for every layer.
    ``roles``: adapter roles to compress (null = all attention and MLP linears).
    ``omit``: substrings of qualified names to leave dense.
    ``calibration``: samples for decomposers with ``needs_calibration``
    (:class:`~compresslab.compress.calibration.CalibrationSettings` or its options);
    their input statistics are collected block by block, on the dense model's activations
    (``calibration.inputs: dense``) or on the already-compressed prefix (``compressed``),
    so only one block's statistics are alive at a time, and each dense layer is
    released as soon as its factors replace it (peak memory: the model plus one block's
    statistics and factors, not a second copy of the compressed layers).
    """

    def __init__(self, decomposer: Decomposer, ratio: float | None = None,
                 rank: int | None = None, round_to: int = 1, round_slack: float | None = None,
                 roles: Sequence[str] | None = None, omit: Sequence[str] = (),
                 calibration: CalibrationSettings | dict | None = None):
        self.decomposer, self.ratio, self.rank, self.round_to = decomposer, ratio, rank, round_to
        self.round_slack = round_slack
        self.roles = list(roles) if roles is not None else None
        self.omit = list(omit)
        if not isinstance(calibration, CalibrationSettings):
            calibration = CalibrationSettings(**dict(calibration or {}))
        self.calibration = calibration

    def ranks(self, model: nn.Module, ctx: RunContext) -> dict[str, int]:
        layers = select_linears(model, ctx.adapter, self.roles, self.omit)
        return {name: resolve_rank(name, lin.in_features, lin.out_features, ratio=self.ratio,
                                   rank=self.rank, round_to=self.round_to,
                                   round_slack=self.round_slack)
                for name, lin in layers.items()}

    def check(self, model, ctx):
        from compresslab.errors import ConfigError

        if not self.ranks(model, ctx):
            raise ConfigError(f"stage {self.name}: no layer matches roles={self.roles} "
                              f"omit={self.omit}")
        if self.decomposer.needs_calibration:
            self.calibration.check(ctx.data)
            if (self.calibration.inputs == "compressed"
                    and self.decomposer.input_statistic() is None):
                raise ConfigError(f"stage {self.name}: {type(self.decomposer).__name__} takes "
                                  f"its statistics from the dense model only; "
                                  f"calibration.inputs=compressed is not available")

    def check_data(self, ctx):
        from compresslab.data.base import check_calibration_size

        if self.decomposer.needs_calibration and self.calibration.data is None:
            check_calibration_size(ctx.data, self.calibration.num_samples,
                                   "method.calibration.num_samples")

    def layers_with_stats(self, model: nn.Module, ctx: RunContext, ranks: dict[str, int]):
        """Yield ``(name, rank, stats)``; with calibration, block by block: the caller
        replaces the layers of a block before the next block's statistics are collected."""
        if not self.decomposer.needs_calibration:
            for name, rank in ranks.items():
                yield name, rank, None
            return
        # whole task batches: model-level statistics may need the loss (FWSVD's Fisher
        # rows on images need the labels); block statistics see the inputs only
        labelled = self.calibration.batches(ctx.data, with_labels=True)
        batches = [model_inputs(b) for b in labelled]
        task = (self.calibration.data or ctx.data).task
        layers = {name: model.get_submodule(name) for name in ranks}
        whole = self.decomposer.model_statistics(model, ctx.adapter, task, labelled, layers)
        del layers  # holding every dense layer would keep them all alive until the end
        if self.decomposer.input_statistic() is None:
            for name, rank in ranks.items():
                yield name, rank, whole.get(name)
            return
        names = {id(m): n for n, m in model.named_modules()}
        calib = BlockwiseCalibration(model, ctx.adapter, batches)
        for _, block in calib:
            mine = {names[id(lin)]: lin for lin in ctx.adapter.block_linears(block).values()
                    if names.get(id(lin)) in ranks}
            # dense inputs: the block's outputs are kept before it is compressed and feed the
            # next block, so every block sees the uncompressed model's activations
            stats = calib.collect(block, mine, self.decomposer.input_statistic,
                                  keep_outputs=self.calibration.inputs == "dense")
            mine = list(mine)       # names only: each dense layer is freed once replaced
            for name in mine:
                yield name, ranks[name], stats.pop(name)
            del stats

    def run(self, model, ctx):
        start = time.perf_counter()
        ranks = self.ranks(model, ctx)
        dense_total = count_params(model)
        kept = dense = 0
        for name, rank, stats in track(self.layers_with_stats(model, ctx, ranks),
                                       f"{self.name}: factorising", total=len(ranks),
                                       enabled=progress_enabled(ctx.cfg)):
            layer = model.get_submodule(name)
            left, right = self.decomposer(layer.weight, rank, name, stats)
            del stats  # keep at most one block's statistics alive
            if not (bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())):
                raise NumericalError(f"stage {self.name}: the factors of {name} are not finite "
                                     f"(NaN/Inf weights or statistics)")
            set_module(model, name, LowRankLinear.from_factors(left, right, layer.bias))
            del left, right
            dense += layer.in_features * layer.out_features
            kept += lowrank_params(layer.in_features, layer.out_features, rank)
            ctx.plan[name] = model.get_submodule(name).plan_entry()
            del layer  # the dense weight is freed as soon as its factors replace it
        ctx.log({f"{self.name}/params_ratio": 1 - kept / dense,
                 f"{self.name}/params_kept": kept,   # the budget other rows are compared at
                 f"{self.name}/model_params_ratio": 1 - count_params(model) / dense_total,
                 f"{self.name}/layers": len(ranks),
                 **{f"{self.name}/{k}": v for k, v in self.decomposer.report().items()},
                 f"{self.name}/time_s": time.perf_counter() - start})
        return model
