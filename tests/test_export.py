"""Compressed models leave the framework: each kind exported and reloaded by the plain
library (transformers / timm) computes the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compresslab import load_compressed
from compresslab.errors import ConfigError
from compresslab.export import export_model, main
from compresslab.pipeline import run
from conftest import TINY_LLAMA, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def reload_plain(out, trust_remote_code=False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust_remote_code,
                                                local_files_only=True).eval()


def sliced(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = linear.weight[rows if rows is not None else slice(None)]
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=False)
    new.weight.data.copy_(w)
    return new


def prune_mlp(model, layer: int, keep: int) -> None:
    """Keep the first ``keep`` MLP channels of one block (rows of gate/up, columns of down)."""
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj = sliced(mlp.gate_proj, rows=slice(0, keep))
    mlp.up_proj = sliced(mlp.up_proj, rows=slice(0, keep))
    mlp.down_proj = sliced(mlp.down_proj, cols=slice(0, keep))


def prune_kv_group(model, layer: int) -> None:
    """Remove the second key/value group (2 query heads, 1 kv head of head_dim 8)."""
    a = model.model.layers[layer].self_attn
    a.q_proj = sliced(a.q_proj, rows=slice(0, 16))
    a.k_proj = sliced(a.k_proj, rows=slice(0, 8))
    a.v_proj = sliced(a.v_proj, rows=slice(0, 8))
    a.o_proj = sliced(a.o_proj, cols=slice(0, 16))


def test_lowrank_run_exports_with_remote_code_and_tokenizer(shared_root, tmp_path):
    cfg = compose_cfg([*TINY_LLAMA, "method=svd", "method.ratio=0.4"], shared_root,
                      tmp_path / "run")
    run(cfg)
    compressed = tmp_path / "run" / "compressed"
    assert main([str(compressed), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    reloaded = reload_plain(out, trust_remote_code=True)
    model = load_compressed(compressed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == \
        sum(p.numel() for p in model.parameters())          # the saving survives
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok("def f(x):\n")["input_ids"]                  # the run's BPE, beside it
    config = json.loads((out / "config.json").read_text())
    assert {e["kind"] for e in config["compresslab_layers"].values()} == {"lowrank"}
    # a second export into the same folder is refused, the first one kept
    assert main([str(compressed), str(out)]) == 2
    assert (out / "model.safetensors").is_file()


def test_per_layer_pruned_llama_needs_remote_code(tmp_path):
    model = tiny_llama()
    prune_mlp(model, 0, 40)
    prune_kv_group(model, 1)
    info = export_model(model, tmp_path / "out")
    assert info["trust_remote_code"]
    reloaded = reload_plain(tmp_path / "out", trust_remote_code=True)
    torch.testing.assert_close(logits(reloaded, IDS), logits(model, IDS), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="trust_remote_code"):   # refused without the code
        reload_plain(tmp_path / "out")


def test_uniformly_pruned_llama_is_a_plain_config(tmp_path):
    model = tiny_llama()
    for layer in (0, 1):
        prune_mlp(model, layer, 40)
        prune_kv_group(model, layer)
    info = export_model(model, tmp_path / "out")
    assert not info["trust_remote_code"]
    reloaded = reload_plain(tmp_path / "out")
    assert reloaded.config.intermediate_size == 40
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(logits(reloaded, IDS), logits(model, IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["soka", "lora"])
def test_adapters_are_merged_into_a_stock_checkpoint(which, tmp_path):
    from compresslab.compress.kpsvd import KronShape
    from compresslab.layers.kronecker import KroneckerAdapterLinear

    model = tiny_llama()
    if which == "soka":
        mlp = model.model.layers[0].mlp
        mlp.up_proj = KroneckerAdapterLinear.from_linear(mlp.up_proj, KronShape(8, 4, 8, 8), 2,
                                                         "zero")
        for p in mlp.up_proj.parameters():
            p.data.add_(0.05 * torch.randn_like(p))          # a trained adapter's delta
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False)).base_model.model
    info = export_model(model, tmp_path / "out")
    assert info["merged_adapters"] >= 1 and not info["trust_remote_code"]
    reloaded = reload_plain(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, IDS), logits(model, IDS), atol=1e-5, rtol=0)


def test_lowrank_vit_exports_to_timm(tmp_path):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from compresslab.compress.lowrank import truncated_svd_factors
    from compresslab.layers.lowrank import LowRankLinear

    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                              embed_dim=32, depth=2, num_heads=4).eval()
    fc1 = model.blocks[0].mlp.fc1
    model.blocks[0].mlp.fc1 = LowRankLinear.from_factors(
        *truncated_svd_factors(fc1.weight, 8), fc1.bias)
    info = export_model(model, tmp_path / "out")
    assert info == {**info, "format": "timm", "densified": 1}
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-5, rtol=0)


def test_save_pretrained_of_a_loaded_compressed_model_refuses(shared_root, tmp_path):
    cfg = compose_cfg([*TINY_LLAMA, "method=svd", "method.ratio=0.4"], shared_root,
                      tmp_path / "run")
    run(cfg)
    model = load_compressed(tmp_path / "run" / "compressed")
    with pytest.raises(ConfigError, match="compresslab.export"):
        model.save_pretrained(tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
