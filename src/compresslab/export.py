"""Compressed models out of the framework: a folder that plain transformers or timm load.

    python -m compresslab.export <run>/compressed <out> [--tokenizer FILE_OR_FOLDER]

What the folder holds depends on what the compression left (docs/export.md):

- dense shapes only (merged adapters, or adapters merged here): the stock checkpoint
  (``config.json`` + ``model.safetensors``), loaded by ``AutoModelForCausalLM`` or
  ``timm.create_model("local-dir:<out>")``;
- a LLaMA-family model pruned to the same sizes in every block: the stock checkpoint with
  the new sizes in its config (``intermediate_size``, head counts, an explicit ``head_dim``);
- a LLaMA-family model with factorised or per-layer-pruned linears: the stock checkpoint
  plus ``modeling_compresslab.py``, a subclass of the transformers class that replaces the
  listed linears (``config.compresslab_layers``) before the weights load
  (``trust_remote_code=True``);
- a timm ViT with factorised linears: each factorised weight multiplied back into a dense
  linear (same outputs, no parameter saving: timm has no per-layer shapes); a pruned timm
  ViT is refused.

Every export is reloaded with the plain library and compared with the model it came from
before the folder is moved into place; a mismatch stops with an error and leaves nothing.
The tokenizer (the compressed folder's, or ``--tokenizer``) is saved beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresslab.checkpoints import is_hf, load_compressed
from compresslab.data.text import save_tokenizer
from compresslab.errors import ConfigError

REMOTE_CODE = Path(__file__).parent / "export_code" / "modeling_compresslab.py"
TOLERANCE = 1e-4          # max |difference| of outputs, relative to the largest output


# -- what the model holds -------------------------------------------------------------------------

def merge_adapters(model: nn.Module) -> int:
    """Fold SoKA and peft adapters into plain linears (in place); how many were merged."""
    from compresslab.layers.kronecker import KroneckerAdapterLinear
    from compresslab.models.utils import set_module

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, KroneckerAdapterLinear):
            set_module(model, name, module.merged())
        elif type(module).__module__.startswith("peft."):
            from peft.tuners.tuners_utils import BaseTunerLayer

            if not isinstance(module, BaseTunerLayer):
                continue
            module.merge()
            set_module(model, name, module.get_base_layer())
        else:
            continue
        merged += 1
    return merged


def compressed_linears(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    """Linears of ``model`` that differ from ``reference`` (the architecture its config
    describes): factorised (``lowrank``) or resized (``linear``)."""
    from compresslab.layers.base import linear_entry
    from compresslab.layers.lowrank import LowRankLinear

    stock = dict(reference.named_modules())
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            layers[name] = module.plan_entry()
        elif isinstance(module, nn.Linear) and isinstance(stock.get(name), nn.Linear) and \
                module.weight.shape != stock[name].weight.shape:
            layers[name] = linear_entry("linear", module.in_features, module.out_features,
                                        module.bias is not None)
    return layers


def densify_lowrank(model: nn.Module) -> int:
    """Replace every factorised linear by the dense linear it applies (in place)."""
    from compresslab.layers.lowrank import LowRankLinear
    from compresslab.models.utils import set_module

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name, low in found:
        dense = nn.Linear(low.in_features, low.out_features, bias=low.bias is not None,
                          dtype=low.first.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(low.dense_weight())
            if low.bias is not None:
                dense.bias.copy_(low.bias)
        set_module(model, name, dense)
    return len(found)


# -- transformers --------------------------------------------------------------------------------

def uniform_sizes(model: nn.Module, layers: dict[str, dict]) -> dict[str, int] | None:
    """New config sizes when every block was pruned alike (no factorised layer): the MLP
    width and the head counts; None when the blocks differ."""
    if any(e["kind"] != "linear" for e in layers.values()):
        return None
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = set()
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        sizes.add((m.gate_proj.out_features, a.q_proj.out_features // head_dim,
                   a.k_proj.out_features // head_dim))
    if len(sizes) != 1:
        return None
    mlp, heads, kv = sizes.pop()
    changes = {"intermediate_size": mlp, "num_attention_heads": heads,
               "num_key_value_heads": kv, "head_dim": head_dim}
    try:   # transformers may refuse the sizes (e.g. hidden size not a multiple of the heads)
        type(config)(**{**config.to_dict(), **changes})
    except Exception:  # noqa: BLE001  (validators raise ValueError or hub dataclass errors)
        return None
    return changes


def save_hf(model, out: Path, config_changes: dict[str, Any]) -> None:
    """``save_pretrained`` of the stock class (bypassing the refusal that
    :func:`~compresslab.checkpoints.guard_save` puts on loaded compressed models), then
    ``config_changes`` written into config.json."""
    from transformers import PreTrainedModel

    PreTrainedModel.save_pretrained(model, out)
    path = out / "config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def export_hf(model, out: Path) -> dict[str, Any]:
    import transformers

    base = type(model).__name__
    with torch.device("meta"):
        reference = type(model)(copy.deepcopy(model.config))
    layers = compressed_linears(model, reference)
    if not layers:
        save_hf(model, out, {})
        return {"format": "transformers", "trust_remote_code": False}
    sizes = uniform_sizes(model, layers)
    if sizes is not None:
        save_hf(model, out, sizes)
        return {"format": "transformers", "trust_remote_code": False, "resized": sizes}
    if getattr(transformers, base, None) is not type(model):
        raise ConfigError(f"export: {base} is not a transformers class; only stock "
                          f"transformers models can be exported with their compressed layers")
    config_base, model_type = type(model.config).__name__, model.config.model_type
    code = (REMOTE_CODE.read_text().replace("LlamaForCausalLM", base)
            .replace("LlamaConfig", config_base)
            .replace('"compresslab_llama"', f'"compresslab_{model_type}"'))
    save_hf(model, out, {"compresslab_layers": layers, "architectures": [f"Compressed{base}"],
                         "model_type": f"compresslab_{model_type}",
                         "auto_map": {
                             "AutoConfig": f"modeling_compresslab.Compressed{config_base}",
                             "AutoModelForCausalLM": f"modeling_compresslab.Compressed{base}"}})
    (out / REMOTE_CODE.name).write_text(code)
    return {"format": "transformers", "trust_remote_code": True, "layers": len(layers),
            "model_class": f"Compressed{base}", "_code": code}


def shipped_class(code: str, name: str):
    """Class ``name`` of the model code written into the folder, compiled here from the
    text this module generated (nothing is read back from the folder and run)."""
    import types

    module = types.ModuleType("modeling_compresslab")
    exec(compile(code, REMOTE_CODE.name, "exec"), module.__dict__)  # noqa: S102 (our text)
    return getattr(module, name)


def reload_hf(out: Path, info: dict) -> nn.Module:
    """The folder as transformers loads it: the stock auto class, or the shipped class."""
    from transformers import AutoModelForCausalLM

    if not info["trust_remote_code"]:
        return AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                    dtype=torch.float32).eval()
    cls = shipped_class(info.pop("_code"), info["model_class"])
    return cls.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()


# -- timm ------------------------------------------------------------------------------------------

def vit_args(model) -> dict[str, Any]:
    """The constructor arguments that rebuild a timm ViT of ``model``'s shapes."""
    embed = model.patch_embed
    blocks = model.blocks
    dim = model.embed_dim
    return {"img_size": list(embed.img_size), "patch_size": list(embed.patch_size),
            "in_chans": embed.proj.in_channels, "num_classes": model.num_classes,
            "embed_dim": dim, "depth": len(blocks), "num_heads": blocks[0].attn.num_heads,
            "mlp_ratio": blocks[0].mlp.fc1.out_features / dim,
            "qkv_bias": blocks[0].attn.qkv.bias is not None,
            "class_token": model.cls_token is not None, "global_pool": model.global_pool,
            "no_embed_class": model.no_embed_class, "reg_tokens": model.num_reg_tokens}


def export_timm(model, out: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    densified = densify_lowrank(model)
    args = vit_args(model)
    with torch.device("meta"):
        import timm

        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    if compressed_linears(model, reference):
        raise ConfigError("export: this ViT has pruned layers; timm has no per-layer sizes, "
                          "so it cannot be exported to a plain timm checkpoint")
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    config = {"architecture": architecture or "vit_tiny_patch16_224", "model_args": args,
              "num_classes": model.num_classes, "num_features": model.num_features,
              "pretrained_cfg": {"input_size": [args["in_chans"], *args["img_size"]],
                                 "num_classes": model.num_classes}}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if densified:
        warnings.warn(f"export: {densified} factorised linears multiplied back into dense "
                      f"ones (timm has no low-rank layer): same outputs, no parameter saving",
                      stacklevel=3)
    return {"format": "timm", "densified": densified}


def reload_timm(out: Path, info: dict) -> nn.Module:
    import timm

    return timm.create_model(f"local-dir:{out}", pretrained=True).eval()


# -- the export ------------------------------------------------------------------------------------

def example_input(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if hasattr(model, "config") and hasattr(model.config, "vocab_size"):
        return torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    embed = model.patch_embed
    return torch.randn(2, embed.proj.in_channels, *embed.img_size, generator=g)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out).double()


def check_round_trip(model: nn.Module, reloaded: nn.Module) -> float:
    x = example_input(model)
    want, got = outputs(model, x), outputs(reloaded, x)
    error = (want - got).abs().max().item()
    if not error <= TOLERANCE * max(1.0, want.abs().max().item()):
        raise ConfigError(f"export: the reloaded model's outputs differ by {error:.3g}; "
                          f"nothing was written")
    return error


def is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def export_model(model: nn.Module, out: str | Path, tokenizer=None) -> dict[str, Any]:
    """Write ``model`` (compressed or not) to the new folder ``out`` for plain
    transformers/timm; returns what was written (format, whether remote code is needed,
    the round trip's largest output difference)."""
    out = Path(out)
    check_target(out)
    if not (is_hf(model) or is_timm_vit(model)):
        raise ConfigError(f"export: {type(model).__name__} is neither a transformers model "
                          f"nor a timm ViT")
    original = model.eval()
    model = copy.deepcopy(model)
    merged = merge_adapters(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = export_hf(model, tmp) if is_hf(model) else export_timm(model, tmp)
        reloaded = reload_hf(tmp, info) if is_hf(model) else reload_timm(tmp, info)
        info.update({"merged_adapters": merged,
                     "max_output_difference": check_round_trip(original, reloaded)})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        (tmp / "compresslab_export.json").write_text(json.dumps(info, indent=1))
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: {out} exists and is not empty; choose a new folder")
    if out.is_dir():
        out.rmdir()


def folder_tokenizer(path: Path):
    """A tokenizer from a ``tokenizer.json`` file or a folder holding tokenizer files."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return None


def export(compressed: str | Path, out: str | Path, tokenizer: str | Path | None = None,
           trust_remote_code: bool = False) -> dict[str, Any]:
    """Export a run's compressed folder (``<run>/compressed``) to ``out``."""
    out = Path(out)
    check_target(out)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ConfigError(f"export: tokenizer {tokenizer} does not exist")
    model = load_compressed(compressed, trust_remote_code=trust_remote_code)
    tok = folder_tokenizer(Path(tokenizer or compressed))
    if tok is None and is_hf(model):
        warnings.warn(f"export: no tokenizer in {compressed}; pass --tokenizer", stacklevel=2)
    return export_model(model, out, tok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compresslab.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("compressed", help="a run's compressed-model folder (<run>/compressed)")
    parser.add_argument("out", help="new folder to write")
    parser.add_argument("--tokenizer", help="tokenizer.json or a tokenizer folder (default: "
                        "the one saved in the compressed folder)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a local base checkpoint's own model code run")
    args = parser.parse_args(argv)
    try:
        info = export(args.compressed, args.out, args.tokenizer, args.trust_remote_code)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = ("AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)"
           if info.get("trust_remote_code") else
           "AutoModelForCausalLM.from_pretrained(out)" if info["format"] == "transformers"
           else 'timm.create_model("local-dir:<out>", pretrained=True)')
    print(f"wrote {args.out} ({info['format']}; load with {how}; largest output difference "
          f"{info['max_output_difference']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
