"""Deep linear network W_L ... W_1 with a small scaled-orthogonal initialisation."""

from __future__ import annotations

import torch
from torch import nn


class DeepLinearNetwork(nn.Module):
    """``x -> W_L ... W_1 x`` with layer shapes given by ``dims`` (input first).

    Each layer starts at ``init_scale * O`` with ``O`` a random (semi-)orthogonal
    matrix, the small initialisation under which deep linear networks learn
    one singular value at a time.
    """

    def __init__(self, dims: list[int], init_scale: float = 1e-2,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        if len(dims) < 2:
            raise ValueError("a deep linear network needs at least an input and output size")
        self.dims = list(dims)
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out, bias=False, dtype=dtype) for d_in, d_out in zip(dims, dims[1:]))
        with torch.no_grad():
            for layer in self.layers:
                nn.init.orthogonal_(layer.weight)
                layer.weight.mul_(init_scale)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def end_to_end(self) -> torch.Tensor:
        """The product ``W_L ... W_1`` (output x input)."""
        from compresslab.models.utils import weight_of

        product = weight_of(self.layers[0])
        for layer in self.layers[1:]:
            product = weight_of(layer) @ product
        return product
