"""MLP classifier whose last layers can be a deep linear block (docs/dln.md, nonlinear).

``x -> flatten -> [Linear, ReLU] x len(hidden) -> head``, where the head is
``head_depth`` linear layers with no nonlinearity between them: one layer is the
plain MLP, several of width ``hidden[-1]`` the "original + DLN" network, and a
smaller ``head_width`` the compressed one. The head's layers start at
``head_init_scale * O`` (scaled orthogonal, as in a deep linear network) when a
scale is given, else at PyTorch's default.
"""

from __future__ import annotations

from torch import nn

from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.models.architecture import (
    ArchitectureAdapter,
    ModelSource,
    instance_of,
    register_adapter,
)


class MLPClassifier(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], head_dims: list[int],
                 head_init_scale: float | None = None):
        super().__init__()
        dims = [in_features, *hidden]
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in
                                  zip(head_dims, head_dims[1:]))
        if head_init_scale is not None:
            for layer in self.head:
                nn.init.orthogonal_(layer.weight)
                layer.weight.data.mul_(head_init_scale)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.body:
            x = layer(x).relu()
        for layer in self.head:
            x = layer(x)
        return x


@register_adapter(instance_of(__name__, "MLPClassifier"))
class MLPAdapter(ArchitectureAdapter):
    """Every body and head linear is a block of its own."""

    modality = "image"

    def blocks(self, model):
        return [*model.body, *model.head]

    def block_linears(self, block):
        return {"linear": block}


class MLP(ModelSource):
    """``hidden``: widths of the ReLU layers; ``head_depth``/``head_width``: the linear head
    (``head_width`` null: ``hidden[-1]``); ``head_init_scale``: eps of its orthogonal init."""

    modality = "image"

    def __init__(self, hidden: list[int] = (256, 256), head_depth: int = 1,
                 head_width: int | None = None, head_init_scale: float | None = None):
        self.hidden, self.head_depth = list(hidden), head_depth
        self.head_width, self.head_init_scale = head_width, head_init_scale

    def check(self) -> None:
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError("mlp: hidden must list at least one positive width")
        if self.head_depth < 1:
            raise ConfigError(f"mlp: head_depth must be at least 1, got {self.head_depth}")
        if self.head_width is not None and self.head_width < 1:
            raise ConfigError(f"mlp: head_width must be positive, got {self.head_width}")

    def build(self, spec: DataSpec) -> nn.Module:
        width = self.head_width or self.hidden[-1]
        head = [self.hidden[-1]] + [width] * (self.head_depth - 1) + [spec.num_classes]
        inputs = spec.channels * spec.image_size ** 2
        return MLPClassifier(inputs, self.hidden, head, self.head_init_scale)


def head_params(hidden: int, width: int, depth: int, classes: int) -> int:
    """Weights of a linear head of ``depth`` layers (for docs and tests)."""
    dims = [hidden] + [width] * (depth - 1) + [classes]
    return sum(a * b for a, b in zip(dims, dims[1:])) if depth else 0

