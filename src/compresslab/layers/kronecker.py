"""SoKA adapter layer: frozen residual + trainable Kronecker sum ``sum_k A_k kron B_k``.

``init="kpsvd"`` (PiSSA-like): A_k, B_k are the top-K KPSVD terms of the pre-trained
weight and the frozen residual is ``W - sum_k A_k kron B_k`` computed by subtraction,
so the adapted layer equals the original at initialisation whatever the SVD's
accuracy. ``init="zero"``: the residual is W and the delta starts at zero (A_k
random, B_k zero, as LoKr/LoRA do).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.compress.kpsvd import KronShape, kpsvd, kron_sum
from compresslab.layers.base import SavedForm, linear_entry


class KroneckerAdapterLinear(SavedForm, nn.Module):
    kind = "kronecker_adapter"

    def __init__(self, in_features: int, out_features: int, shape: KronShape, terms: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.shape = in_features, out_features, shape
        self.residual = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype),
                                     requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.a = nn.Parameter(torch.zeros(terms, shape.m, shape.n, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(terms, shape.p, shape.q, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, shape: KronShape, terms: int,
                    init: str = "kpsvd") -> KroneckerAdapterLinear:
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, shape, terms,
                    bias=linear.bias is not None, dtype=w.dtype)
        with torch.no_grad():
            if init == "kpsvd":
                top = kpsvd(w, shape, terms)
                layer.a.copy_(top.a)
                layer.b.copy_(top.b)
                layer.residual.copy_((w.double() - kron_sum(top.a, top.b)).to(w.dtype))
            else:  # zero delta: B = 0, A Kaiming-uniform like LoRA's A
                nn.init.kaiming_uniform_(layer.a, a=math.sqrt(5))
                layer.residual.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def terms(self) -> int:
        return self.a.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return kron_sum(self.a, self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the delta is materialised (as peft's LoKr does): one (out x in) product per step
        # is far cheaper than applying the K Kronecker terms to every token (kron_apply:
        # 30-100x slower on CPU at K=4-16 for 64-wide layers), and the gradients are the same
        return F.linear(x, self.residual + self.delta_weight(), self.bias)

    def merged(self) -> nn.Linear:
        """An ``nn.Linear`` with ``W_res + sum_k A_k kron B_k`` (deployment)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.residual.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.residual + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        s = self.shape
        return (f"in={self.in_features}, out={self.out_features}, terms={self.terms}, "
                f"A={s.m}x{s.n}, B={s.p}x{s.q}")

    def plan_entry(self) -> dict[str, Any]:
        s = self.shape
        return linear_entry(self.kind, self.in_features, self.out_features,
                            self.bias is not None, terms=self.terms, shape=[s.m, s.n, s.p, s.q])

    @classmethod
    def from_plan(cls, entry: dict[str, Any], dtype: torch.dtype) -> KroneckerAdapterLinear:
        return cls(entry["in_features"], entry["out_features"], KronShape(*entry["shape"]),
                   entry["terms"], bias=entry["bias"], dtype=dtype)
