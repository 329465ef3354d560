"""One adapter per architecture: it names the parts algorithms work on.

Algorithms ask an adapter for "the blocks", "the attention linears of block i",
"the MLP linears", "the compressible linears", "logits and block outputs for a
batch" and never branch on model names. Supporting a new architecture means
writing one small adapter class and registering it with :func:`register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn


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


class LlamaAdapter(ArchitectureAdapter):
    """HF LLaMA-family causal LMs (LlamaForCausalLM and look-alikes)."""

    modality = "text"

    def blocks(self, model):
        return list(model.model.layers)

    def attention_linears(self, block):
        a = block.self_attn
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj}

    def mlp_linears(self, block):
        m = block.mlp
        return {"gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}

    def attention_groups(self, block):
        a = block.self_attn
        return a.k_proj.out_features // a.head_dim, a.num_key_value_groups, a.head_dim

    def logits(self, model, inputs):
        return model(input_ids=inputs, use_cache=False).logits


class TimmViTAdapter(ArchitectureAdapter):
    """timm VisionTransformer (fused qkv attention, fc1/fc2 MLP)."""

    modality = "image"

    def blocks(self, model):
        return list(model.blocks)

    def attention_linears(self, block):
        return {"qkv": block.attn.qkv, "o": block.attn.proj}

    def mlp_linears(self, block):
        return {"up": block.mlp.fc1, "down": block.mlp.fc2}

    def attention_groups(self, block):
        a = block.attn
        # an output norm or gate over all heads would need slicing too: not described
        if not isinstance(getattr(a, "norm", nn.Identity()), nn.Identity) \
                or getattr(a, "gate", None) is not None:
            raise NotImplementedError("timm attention with scale_norm or a gate: heads are "
                                      "not described")
        return a.qkv.out_features // (3 * a.head_dim), 1, a.head_dim

    def attention_projections(self, block):
        # qkv rows: [q heads | k heads | v heads], each part heads x head_dim, head-major
        a = block.attn
        width = a.qkv.out_features // 3
        return {"q": (a.qkv, 0), "k": (a.qkv, width), "v": (a.qkv, 2 * width),
                "o": (a.proj, 0)}

    def set_attention_heads(self, block, kv_heads, heads):
        # timm's Attention.forward reshapes by num_heads and attn_dim; head_dim stays
        a = block.attn
        a.num_heads = heads
        a.attn_dim = heads * a.head_dim


class DeepLinearAdapter(ArchitectureAdapter):
    """Deep linear networks: every layer is a block and its own linear."""

    modality = "matrix"

    def blocks(self, model):
        return list(model.layers)

    def block_linears(self, block):
        return {"linear": block}


_ADAPTERS: list[tuple[Callable[[nn.Module], bool], type[ArchitectureAdapter]]] = []


def register_adapter(matches: Callable[[nn.Module], bool]):
    """Class decorator: use this adapter for models where ``matches(model)`` is true."""
    def wrap(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
        _ADAPTERS.append((matches, cls))
        return cls
    return wrap


def _class_named(*names: str) -> Callable[[Any], bool]:
    return lambda model: type(model).__name__ in names


register_adapter(_class_named("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))(
    LlamaAdapter)
register_adapter(_class_named("VisionTransformer"))(TimmViTAdapter)
register_adapter(_class_named("DeepLinearNetwork"))(DeepLinearAdapter)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    for matches, cls in _ADAPTERS:
        if matches(model):
            return cls()
    known = ", ".join(sorted({c.__name__ for _, c in _ADAPTERS}))
    raise UnknownArchitectureError(
        f"no architecture adapter for {type(model).__name__} (known adapters: {known})")
