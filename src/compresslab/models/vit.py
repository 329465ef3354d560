"""Vision transformers (timm): the embedded small ViT trained here, a timm architecture
with a local weights file, and the adapter naming their fused qkv, projection and MLP."""

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
    register_adapter,
)


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


@family_source
def vit(weights: str | None = None, name: str = "vit_tiny_patch16_224",
        img_size: int | None = None, kwargs: dict | None = None, **embedded) -> ModelSource:
    """``model=vit``: the timm architecture ``name`` with a local ``weights`` file, or
    without one the embedded :class:`TinyViT` built from ``embedded`` and trained here."""
    if weights:
        return TimmViT(name, weights, img_size, kwargs)
    return TinyViT(**embedded)


@register_adapter(instance_of("timm.models.vision_transformer", "VisionTransformer"))
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
