"""LLaMA-family causal LMs (HF transformers): the embedded small LLaMA trained here, any
local checkpoint folder, and the adapter naming their attention and MLP linears (it also
serves ``model=ar_image``, a LLaMA over image tokens)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.models.architecture import (
    ArchitectureAdapter,
    ModelSource,
    family_source,
    instance_of,
    parse_dtype,
    register_adapter,
    require_dir,
)


class TinyLlama(ModelSource):
    """A small HF ``LlamaForCausalLM`` trained here from scratch."""

    modality = "text"

    def __init__(self, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                 num_kv_heads: int | None = None, intermediate_size: int = 352,
                 max_position_embeddings: int = 512, tie_word_embeddings: bool = True,
                 rope_theta: float = 10000.0):
        self.kwargs = dict(hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads or num_heads,
                           intermediate_size=intermediate_size,
                           max_position_embeddings=max_position_embeddings,
                           tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta)

    def check(self) -> None:
        h, n, kv = (self.kwargs[k] for k in
                    ("hidden_size", "num_attention_heads", "num_key_value_heads"))
        if h % n or n % kv:
            raise ConfigError(f"llama: hidden_size {h} must divide into num_heads {n}, "
                              f"and num_heads into num_kv_heads {kv}")

    def build(self, spec: DataSpec) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=spec.vocab_size, **self.kwargs)
        return LlamaForCausalLM(config)


class LocalHFCausalLM(ModelSource):
    """Any HF causal LM checkpoint in a local folder (LLaMA family); never downloads."""

    modality = "text"
    loads_weights = True

    def __init__(self, path: str | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False):
        self.path, self.dtype, self.trust_remote_code = path, dtype, trust_remote_code

    def check(self) -> None:
        require_dir(self.path, "model=llama", "config.json")
        parse_dtype(self.dtype)

    def check_weights(self, skeleton: nn.Module) -> None:
        from compresslab.weights_io import tensor_shapes

        own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        for file in sorted(Path(self.path).expanduser().glob("*.safetensors")):
            shapes = tensor_shapes(file)
            wrong = sorted(k for k, s in shapes.items() if k in own and own[k] != s)
            if wrong:
                raise ConfigError(f"weights in {file} do not match {self.path}/config.json "
                                  f"({len(wrong)} of wrong shape, e.g. {wrong[0]}: "
                                  f"{shapes[wrong[0]]} vs {own[wrong[0]]})")

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, local_files_only=True,
                                                 trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the tokenizer of {self.path}: "
                              f"{str(exc).splitlines()[0]}") from None

    def build(self, spec: DataSpec) -> nn.Module:
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(
                self.path, local_files_only=True, dtype=parse_dtype(self.dtype),
                trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ConfigError(f"cannot load checkpoint {self.path}: "
                              f"{str(exc).splitlines()[0]}") from None

    def skeleton(self, spec: DataSpec) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.path, local_files_only=True,
                                            trust_remote_code=self.trust_remote_code)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)


@family_source
def llama(path: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
          **embedded) -> ModelSource:
    """``model=llama``: the local HF checkpoint at ``path``, or without one the embedded
    :class:`TinyLlama` built from ``embedded`` (its settings) and trained here."""
    if path:
        return LocalHFCausalLM(path, dtype, trust_remote_code)
    return TinyLlama(**embedded)


@register_adapter(instance_of("transformers", "LlamaForCausalLM", "MistralForCausalLM",
                              "Qwen2ForCausalLM"))
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
