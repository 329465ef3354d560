"""Deep linear networks ``W_L ... W_1`` (docs/dln.md): the model with its small
scaled-orthogonal initialisation, its source and its adapter (every layer is a block)."""

from __future__ import annotations

import torch
from torch import nn

from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.models.architecture import (
    ArchitectureAdapter,
    ModelSource,
    instance_of,
    parse_dtype,
    register_adapter,
)


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


class DeepLinear(ModelSource):
    """Deep linear network of ``depth`` layers of ``width`` (``width=null``: square)."""

    modality = "matrix"

    def __init__(self, depth: int = 3, width: int | None = None, init_scale: float = 1e-2,
                 dtype: str = "float64"):
        self.depth, self.width, self.init_scale, self.dtype = depth, width, init_scale, dtype

    def check(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"dln: depth must be at least 1, got {self.depth}")
        parse_dtype(self.dtype)

    def build(self, spec: DataSpec) -> nn.Module:
        rows, cols = spec.matrix_shape
        width = self.width or rows
        dims = [cols] + [width] * (self.depth - 1) + [rows]
        return DeepLinearNetwork(dims, self.init_scale, parse_dtype(self.dtype))


@register_adapter(instance_of(__name__, "DeepLinearNetwork"))
class DeepLinearAdapter(ArchitectureAdapter):
    """Deep linear networks: every layer is a block and its own linear."""

    modality = "matrix"

    def blocks(self, model):
        return list(model.layers)

    def block_linears(self, block):
        return {"linear": block}
