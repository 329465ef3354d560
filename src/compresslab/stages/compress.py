"""The low-rank compression stage: replace the adapter's linears by factors."""

from __future__ import annotations

import time
from collections.abc import Sequence

from torch import nn

from compresslab.callbacks.progress import progress_enabled, track
from compresslab.compress.lowrank import LowRankLinear
from compresslab.compress.ratio import lowrank_params, resolve_rank
from compresslab.compress.svd import Decomposer
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
    ``compress.ratio.rank_for_ratio``); or an explicit ``rank`` for every layer.
    ``roles``: adapter roles to compress (null = all attention and MLP linears).
    ``omit``: substrings of qualified names to leave dense.
    """

    def __init__(self, decomposer: Decomposer, ratio: float | None = None,
                 rank: int | None = None, round_to: int = 1,
                 roles: Sequence[str] | None = None, omit: Sequence[str] = ()):
        self.decomposer, self.ratio, self.rank, self.round_to = decomposer, ratio, rank, round_to
        self.roles = list(roles) if roles is not None else None
        self.omit = list(omit)

    def ranks(self, model: nn.Module, ctx: RunContext) -> dict[str, int]:
        layers = select_linears(model, ctx.adapter, self.roles, self.omit)
        return {name: resolve_rank(name, lin.in_features, lin.out_features, ratio=self.ratio,
                                   rank=self.rank, round_to=self.round_to)
                for name, lin in layers.items()}

    def check(self, model, ctx):
        from compresslab.errors import ConfigError

        if not self.ranks(model, ctx):
            raise ConfigError(f"stage {self.name}: no layer matches roles={self.roles} "
                              f"omit={self.omit}")

    def run(self, model, ctx):
        start = time.perf_counter()
        ranks = self.ranks(model, ctx)
        dense_total = count_params(model)
        kept = dense = 0
        for name, rank in track(ranks.items(), f"{self.name}: factorising", total=len(ranks),
                                enabled=progress_enabled(ctx.cfg)):
            layer = model.get_submodule(name)
            left, right = self.decomposer(layer.weight, rank, name)
            set_module(model, name, LowRankLinear.from_factors(left, right, layer.bias))
            dense += layer.in_features * layer.out_features
            kept += lowrank_params(layer.in_features, layer.out_features, rank)
            ctx.plan[name] = {"kind": "lowrank", "rank": rank, "in_features": layer.in_features,
                              "out_features": layer.out_features,
                              "bias": layer.bias is not None}
        ctx.log({f"{self.name}/params_ratio": 1 - kept / dense,
                 f"{self.name}/model_params_ratio": 1 - count_params(model) / dense_total,
                 f"{self.name}/layers": len(ranks),
                 f"{self.name}/time_s": time.perf_counter() - start})
        return model
