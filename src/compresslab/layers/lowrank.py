"""The factorised linear every low-rank method produces.

Convention (used by every low-rank method in the project): a dense layer
``y = W x + b`` with ``W`` of shape (out, in) becomes ``y = B (A x) + b`` where
``A = first.weight`` is (rank, in) and ``B = second.weight`` is (out, rank).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresslab.layers.base import SavedForm, linear_entry


class LowRankLinear(SavedForm, nn.Module):
    """``Linear(in, out)`` factored as ``Linear(rank, out) o Linear(in, rank, bias=False)``."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank {rank} is outside [1, {min(in_features, out_features)}] "
                f"for a {out_features}x{in_features} layer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies."""
        return self.second.weight @ self.first.weight

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor,
                     bias: torch.Tensor | None) -> LowRankLinear:
        """Build from ``left`` (out, r) and ``right`` (r, in) with ``W ~= left @ right``."""
        out_features, rank = left.shape
        layer = cls(right.shape[1], out_features, rank, bias=bias is not None,
                    dtype=left.dtype, device=left.device)
        with torch.no_grad():
            layer.second.weight.copy_(left)
            layer.first.weight.copy_(right)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def plan_entry(self) -> dict[str, Any]:
        return linear_entry(self.kind, self.in_features, self.out_features,
                            self.bias is not None, rank=self.rank)

    @classmethod
    def from_plan(cls, entry: dict[str, Any], dtype: torch.dtype) -> LowRankLinear:
        return cls(entry["in_features"], entry["out_features"], entry["rank"],
                   bias=entry["bias"], dtype=dtype)
