"""How a compressed layer is written into a plan and rebuilt from it.

A compressed model is saved as the base architecture's tensors plus a *plan*: one JSON
entry per replaced module, e.g. ``{"kind": "lowrank", "rank": 38, ...}``. Each layer
class that can appear in a plan says itself how it is written and rebuilt:

- ``kind``: the name written into its entries (unique; registered when the class is
  defined, so a new layer kind needs no edit anywhere else);
- ``plan_entry()``: its entry (the structure only: shapes, counts, switches);
- ``from_plan(entry, dtype)``: an empty layer of that structure (the tensors come
  from the weights file afterwards);
- ``finish_plan(model, name, entry)`` (optional): what the layer's new shape implies
  outside itself, run once every entry is applied (e.g. an attention's head count).

This module imports nothing of the package above it: the checkpoint loader, the resume
logic and every stage use it, and it uses none of them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.models.utils import set_module

#: kind -> layer class, filled as the classes are defined (see :mod:`compresslab.layers`)
FORMS: dict[str, type[SavedForm]] = {}


class SavedForm:
    """Mixin for an ``nn.Module`` that has a plan entry (see the module docstring)."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            if kind in FORMS and FORMS[kind].__qualname__ != cls.__qualname__:
                raise TypeError(f"plan kind {kind!r} is taken by {FORMS[kind].__name__}")
            FORMS[kind] = cls

    def plan_entry(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_plan(cls, entry: dict[str, Any], dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def finish_plan(cls, model: nn.Module, name: str, entry: dict[str, Any]) -> None:
        """Nothing to restore outside the layer (the default)."""


def linear_entry(kind: str, in_features: int, out_features: int, bias: bool,
                 **extra: Any) -> dict[str, Any]:
    """The fields every linear-like entry has, then the kind's own."""
    return {"kind": kind, "in_features": in_features, "out_features": out_features,
            "bias": bias, **extra}


def plan_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Qualified name -> plan entry of every layer in ``model`` that has one."""
    return {name: module.plan_entry() for name, module in model.named_modules()
            if isinstance(module, SavedForm)}


def apply_plan(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the modules a plan names by empty layers of the planned structure (in
    place), then let each kind restore what its shape implies elsewhere."""
    for name, entry in layers.items():
        form = FORMS.get(entry.get("kind"))
        if form is None:
            raise ConfigError(f"plan entry {name} has unknown kind {entry.get('kind')!r}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"plan names module {name}, which the model does not have") \
                from None
        set_module(model, name, _rebuilt(form, name, entry, module))
    for name, entry in layers.items():
        try:
            FORMS[entry["kind"]].finish_plan(model, name, entry)
        except KeyError as exc:
            raise ConfigError(f"plan entry {name} (kind {entry['kind']!r}) lacks {exc}") \
                from None
    return model


def _rebuilt(form: type[SavedForm], name: str, entry: dict[str, Any],
             module: nn.Module) -> nn.Module:
    dtype = next((p.dtype for p in module.parameters()), torch.get_default_dtype())
    try:
        return form.from_plan(entry, dtype)
    except KeyError as exc:
        raise ConfigError(f"plan entry {name} (kind {entry['kind']!r}) lacks {exc}") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"plan entry {name} (kind {entry['kind']!r}) cannot be applied: "
                          f"{reason}") from None
