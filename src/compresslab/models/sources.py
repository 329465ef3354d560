"""Model sources: each model config names one of these through ``_target_``.

A source checks its own settings (before any work), optionally provides a
tokenizer, and builds the ``nn.Module`` for a dataset's :class:`DataSpec`.
Sources never reach a hub: real checkpoints are read from local paths only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from compresslab.errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    """What a model must know about its data to be built."""

    modality: str
    vocab_size: int | None = None
    num_classes: int | None = None
    image_size: int | None = None
    channels: int | None = None
    matrix_shape: tuple[int, int] | None = None


_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class ModelSource:
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


def _require_dir(path: str | None, what: str, must_contain: str) -> Path:
    if not path:
        raise ConfigError(f"{what} needs a local path: set model.path=/path/to/checkpoint")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} path does not exist: {p}")
    if not (p / must_contain).is_file():
        raise ConfigError(f"{what} path {p} has no {must_contain}; is it a checkpoint folder?")
    return p


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
        _require_dir(self.path, "model=llama", "config.json")
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


def llama(path: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
          **embedded) -> ModelSource:
    """``model=llama``: the local HF checkpoint at ``path``, or without one the embedded
    :class:`TinyLlama` built from ``embedded`` (its settings) and trained here."""
    if path:
        return LocalHFCausalLM(path, dtype, trust_remote_code)
    return TinyLlama(**embedded)


class TinyViT(ModelSource):
    """A small timm ``VisionTransformer`` sized for the dataset's images."""

    modality = "image"

    def __init__(self, patch_size: int = 2, embed_dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0):
        self.kwargs = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio)

    def check(self) -> None:
        if self.kwargs["embed_dim"] % self.kwargs["num_heads"]:
            raise ConfigError("vit: embed_dim must be divisible by num_heads")

    def build(self, spec: DataSpec) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        if spec.image_size % self.kwargs["patch_size"]:
            raise ConfigError(f"vit: patch_size {self.kwargs['patch_size']} does not divide "
                              f"the dataset's image size {spec.image_size}")
        return VisionTransformer(img_size=spec.image_size, in_chans=spec.channels,
                                 num_classes=spec.num_classes, **self.kwargs)


class TimmViT(ModelSource):
    """A timm ViT by architecture name with weights from a local file.

    The classification head is re-initialised when the dataset's class count
    differs from the checkpoint's; the base-model stage then trains it.
    """

    modality = "image"
    loads_weights = True

    def __init__(self, name: str = "vit_tiny_patch16_224", weights: str | None = None,
                 img_size: int | None = None, kwargs: dict | None = None):
        self.name, self.weights, self.img_size = name, weights, img_size
        self.kwargs = dict(kwargs or {})  # extra timm constructor arguments (e.g. patch_size)

    def check(self) -> None:
        if not self.weights:
            raise ConfigError("model=vit needs a local weights file: set model.weights=/path")
        if not Path(self.weights).expanduser().is_file():
            raise ConfigError(f"model=vit weights file does not exist: {self.weights}")

    def _misfits(self, shapes: dict[str, tuple], own: dict[str, tuple]) -> list[str]:
        """Tensors of the file that do not fit (a differing ``head.*`` is retrained here)."""
        misfit = sorted(k for k in shapes if k in own and shapes[k] != own[k]
                        and not k.startswith("head."))
        missing = [k for k in own if k not in shapes and not k.startswith("head.")]
        wrong = misfit + missing + [k for k in shapes if k not in own]
        if wrong:
            raise ConfigError(f"weights file {self.weights} does not fit timm model "
                              f"{self.name}: {len(wrong)} mismatched tensors, e.g. {wrong[0]}")
        return [k for k in shapes if k in own and shapes[k] != own[k]]   # heads to drop

    def check_weights(self, skeleton: nn.Module) -> None:
        from compresslab.weights_io import tensor_shapes

        self._misfits(tensor_shapes(Path(self.weights).expanduser()),
                      {k: tuple(v.shape) for k, v in skeleton.state_dict().items()})

    def build(self, spec: DataSpec) -> nn.Module:
        from compresslab.weights_io import read_state_dict

        model = self.skeleton(spec)
        state = read_state_dict(Path(self.weights).expanduser())
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for k in self._misfits({k: tuple(v.shape) for k, v in state.items()}, own):
            state.pop(k)  # a new head is trained here
        model.load_state_dict(state, strict=False)
        return model

    def skeleton(self, spec: DataSpec) -> nn.Module:
        import timm

        return timm.create_model(self.name, pretrained=False, num_classes=spec.num_classes,
                                 in_chans=spec.channels, img_size=self.img_size or spec.image_size,
                                 **self.kwargs)


def vit(weights: str | None = None, name: str = "vit_tiny_patch16_224",
        img_size: int | None = None, kwargs: dict | None = None, **embedded) -> ModelSource:
    """``model=vit``: the timm architecture ``name`` with a local ``weights`` file, or
    without one the embedded :class:`TinyViT` built from ``embedded`` and trained here."""
    if weights:
        return TimmViT(name, weights, img_size, kwargs)
    return TinyViT(**embedded)


#: the family configs' sources (model=llama, model=vit): functions picking a source class
FAMILY_SOURCES = (llama, vit)


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
        from compresslab.models.dln import DeepLinearNetwork

        rows, cols = spec.matrix_shape
        width = self.width or rows
        dims = [cols] + [width] * (self.depth - 1) + [rows]
        return DeepLinearNetwork(dims, self.init_scale, parse_dtype(self.dtype))
