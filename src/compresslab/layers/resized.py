"""Linears whose shape differs from the architecture's: resized (a width-reduced deep
linear network) or pruned (rows/columns of removed heads and channels deleted)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresslab.layers.base import SavedForm, linear_entry


class ResizedLinear(SavedForm, nn.Linear):
    """An ``nn.Linear`` of a new shape; it computes exactly what ``nn.Linear`` does."""

    kind = "resized_linear"

    def plan_entry(self) -> dict[str, Any]:
        return linear_entry(self.kind, self.in_features, self.out_features,
                            self.bias is not None)

    @classmethod
    def from_plan(cls, entry: dict[str, Any], dtype: torch.dtype) -> ResizedLinear:
        return cls(entry["in_features"], entry["out_features"], bias=entry["bias"], dtype=dtype)


class PrunedLinear(ResizedLinear):
    """A linear that lost rows/columns to structured pruning. The layer consuming an
    attention's heads or an MLP's channels also records how many are left (``counts``:
    ``heads``/``kv_heads`` or ``channels``), so a rebuilt attention gets its head count."""

    kind = "pruned_linear"
    COUNTS = ("heads", "kv_heads", "channels")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts: dict[str, int] = {}

    def plan_entry(self) -> dict[str, Any]:
        return {**super().plan_entry(), **self.counts}

    @classmethod
    def from_plan(cls, entry: dict[str, Any], dtype: torch.dtype) -> PrunedLinear:
        layer = super().from_plan(entry, dtype)
        layer.counts = {k: entry[k] for k in cls.COUNTS if k in entry}
        return layer

    @classmethod
    def finish_plan(cls, model: nn.Module, name: str, entry: dict[str, Any]) -> None:
        """The attention whose output projection is ``name`` gets its pruned head counts."""
        if "heads" not in entry:
            return
        from compresslab.models.architecture import adapter_for

        adapter, consumer = adapter_for(model), model.get_submodule(name)
        for block in adapter.blocks(model):
            if adapter.attention_projections(block).get("o", (None,))[0] is consumer:
                adapter.set_attention_heads(block, entry["kv_heads"], entry["heads"])
                return
