"""What an architecture provides, and how the framework finds it.

An architecture is one module of :mod:`compresslab.models` (``llama.py``, ``vit.py``,
``deep_linear.py``, ``mlp.py``) holding:

- its **sources** (:class:`ModelSource`): each model config names one with ``_target_``;
  a source checks its settings before any work, may provide a tokenizer, and builds the
  ``nn.Module`` for the data's :class:`~compresslab.data.spec.DataSpec`. Sources never
  reach a hub: real checkpoints are read from local paths only;
- its **adapter** (:class:`ArchitectureAdapter`), registered for the model classes it
  serves: it names the parts algorithms work on ("the blocks", "the attention linears of
  block i", "the MLP linears", the attention's head layout for structured pruning), so no
  algorithm branches on model names.

Importing any module of the package imports every architecture (``models/__init__.py``),
so :func:`adapter_for` knows them all.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class ModelSource:
    """Builds one architecture's model for a dataset (see the module docstring)."""

    modality: ClassVar[str]
    #: True when the weights are read from a local file rather than trained here
    loads_weights: ClassVar[bool] = False

    def check(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot work; do no real work."""

    def check_weights(self, skeleton: nn.Module) -> None:
        """Raise :class:`ConfigError` if the weights files cannot be read or do not fit
        ``skeleton`` (the architecture on the meta device); reads file headers only where
        the format allows (safetensors)."""

    def tokenizer(self) -> Any | None:
        return None

    def build(self, spec: DataSpec) -> nn.Module:
        raise NotImplementedError

    def skeleton(self, spec: DataSpec) -> nn.Module:
        """The architecture only; called under ``torch.device("meta")``, reads no weights."""
        return self.build(spec)


#: functions a family config (model=llama, model=vit) names instead of a source class: they
#: pick the source (a local checkpoint, or the embedded model trained here)
FAMILY_SOURCES: list[Callable[..., ModelSource]] = []


def family_source(fn: Callable[..., ModelSource]) -> Callable[..., ModelSource]:
    """Mark ``fn`` as a family config's source picker (a saved plan may name it)."""
    FAMILY_SOURCES.append(fn)
    return fn


def require_dir(path: str | None, what: str, must_contain: str) -> Path:
    if not path:
        raise ConfigError(f"{what} needs a local path: set model.path=/path/to/checkpoint")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} path does not exist: {p}")
    if not (p / must_contain).is_file():
        raise ConfigError(f"{what} path {p} has no {must_contain}; is it a checkpoint folder?")
    return p


# -- adapters --------------------------------------------------------------------------------

class UnknownArchitectureError(TypeError):
    """The model's class has no registered adapter."""


class ArchitectureAdapter:
    """Base adapter. Subclasses fill in the part names of one architecture."""

    #: which datasets the architecture consumes: "text", "image" or "matrix"
    modality: ClassVar[str]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def attention_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Role -> linear of the block's attention (e.g. q, k, v, o)."""
        return {}

    def mlp_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Role -> linear of the block's MLP (e.g. gate, up, down)."""
        return {}

    def attention_groups(self, block: nn.Module) -> tuple[int, int, int]:
        """``(key/value heads, query heads per key/value head, head dim)`` of the block's
        attention as it is now (after structured pruning too)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe attention heads")

    def attention_projections(self, block: nn.Module) -> dict[str, tuple[nn.Linear, int]]:
        """Role (q, k, v, o) -> ``(linear, first output row of the role in it)``.

        Separate projections start at row 0; a fused qkv linear is named for each of q, k
        and v with the offset of that part's rows (structured pruning slices it once)."""
        return {role: (lin, 0) for role, lin in self.attention_linears(block).items()}

    def set_attention_heads(self, block: nn.Module, kv_heads: int, heads: int) -> None:
        """Tell the block's attention its head counts after structured pruning removed
        heads (and when a pruned model is rebuilt from its plan). Default: nothing, for
        attention that infers them from its weights' shapes (HF reshapes with -1)."""

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def logits_and_block_outputs(self, model: nn.Module,
                                 inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass returning the logits and every block's output."""
        outputs: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(
            out[0] if isinstance(out, tuple) else out)) for b in self.blocks(model)]
        try:
            logits = self.logits(model, inputs)
        finally:
            for h in hooks:
                h.remove()
        return logits, outputs

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {**self.attention_linears(block), **self.mlp_linears(block)}

    def compressible_linears(self, model: nn.Module) -> dict[str, nn.Module]:
        """Qualified name -> linear, for every attention/MLP linear of every block."""
        names = {id(m): n for n, m in model.named_modules()}
        return {names[id(lin)]: lin for block in self.blocks(model)
                for lin in self.block_linears(block).values()}


_ADAPTERS: list[tuple[Callable[[nn.Module], bool], type[ArchitectureAdapter]]] = []


def register_adapter(matches: Callable[[nn.Module], bool]):
    """Class decorator: use this adapter for models where ``matches(model)`` is true."""
    def wrap(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
        _ADAPTERS.append((matches, cls))
        return cls
    return wrap


def instance_of(module: str, *names: str) -> Callable[[Any], bool]:
    """A matcher: the model is an instance of one of the classes ``names`` of ``module``
    (checked only once that library is loaded: a model of it cannot exist before)."""
    def matches(model) -> bool:
        library = sys.modules.get(module)
        return library is not None and isinstance(
            model, tuple(getattr(library, name) for name in names))
    return matches


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    for matches, cls in _ADAPTERS:
        if matches(model):
            return cls()
    known = ", ".join(sorted({c.__name__ for _, c in _ADAPTERS}))
    raise UnknownArchitectureError(
        f"no architecture adapter for {type(model).__name__} (known adapters: {known})")
