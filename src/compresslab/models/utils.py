"""Small helpers for addressing sub-modules by qualified name."""

from __future__ import annotations

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def count_params(module: nn.Module) -> int:
    """Parameters, counting tied (shared) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def weight_of(module: nn.Module):
    """The (out, in) matrix a linear-like module applies (low-rank layers: their product)."""
    return module.dense_weight() if hasattr(module, "dense_weight") else module.weight
