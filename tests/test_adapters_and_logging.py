"""Architecture adapters name the parts; W&B runs are grouped, tagged and always closed."""

import pytest
import torch
from torch import nn

from compresslab.data.spec import DataSpec
from compresslab.models.architecture import UnknownArchitectureError, adapter_for
from compresslab.models.deep_linear import DeepLinear
from compresslab.models.llama import TinyLlama
from compresslab.models.vit import TinyViT
from compresslab.pipeline import run
from conftest import TINY_LLAMA, compose_cfg


def test_llama_adapter_names_attention_and_mlp():
    model = TinyLlama(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64).build(
        DataSpec("text", vocab_size=50))
    adapter = adapter_for(model)
    assert len(adapter.blocks(model)) == 2
    assert set(adapter.attention_linears(adapter.blocks(model)[0])) == {"q", "k", "v", "o"}
    assert set(adapter.mlp_linears(adapter.blocks(model)[0])) == {"gate", "up", "down"}
    names = list(adapter.compressible_linears(model))
    assert len(names) == 14 and "model.layers.1.mlp.down_proj" in names
    assert "lm_head" not in names
    ids = torch.randint(0, 50, (2, 7))
    logits, blocks = adapter.logits_and_block_outputs(model, ids)
    assert logits.shape == (2, 7, 50) and len(blocks) == 2 and blocks[0].shape == (2, 7, 32)


def test_vit_and_dln_adapters():
    vit = TinyViT(embed_dim=32, depth=3).build(DataSpec("image", num_classes=10, image_size=8,
                                                        channels=1))
    adapter = adapter_for(vit)
    names = list(adapter.compressible_linears(vit))
    assert len(names) == 12 and "blocks.0.attn.qkv" in names and "head" not in names
    logits, blocks = adapter.logits_and_block_outputs(vit, torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10) and len(blocks) == 3
    dln = DeepLinear(depth=3).build(DataSpec("matrix", matrix_shape=(5, 5)))
    assert list(adapter_for(dln).compressible_linears(dln)) == ["layers.0", "layers.1",
                                                               "layers.2"]


def test_unknown_architecture_gets_a_clear_error():
    with pytest.raises(UnknownArchitectureError, match="no architecture adapter for Sequential"):
        adapter_for(nn.Sequential(nn.Linear(2, 2)))


def test_wandb_offline_run_is_grouped_tagged_and_finished(shared_root, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_cfg([*TINY_LLAMA, "method=svd", "logger=wandb", "group=test-group"],
                      shared_root, tmp_path / "run")
    seen = {}
    original_finish = wandb.finish

    def spy_finish(*args, **kwargs):
        seen.update(group=wandb.run.group, tags=tuple(wandb.run.tags), name=wandb.run.name,
                    summary=dict(wandb.run.summary))
        return original_finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", spy_finish)
    metrics = run(cfg)
    assert wandb.run is None
    assert seen["group"] == "test-group" and seen["name"] == cfg.run_name
    assert set(seen["tags"]) == {"svd", "llama_tiny", "pycode"}
    assert seen["summary"]["test/ppl"] == pytest.approx(metrics["test/ppl"])
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_wandb_run_is_finished_when_a_stage_fails(shared_root, tmp_path, monkeypatch):
    import wandb

    from compresslab.stages import compress

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    def broken(self, model, ctx):
        raise RuntimeError("stage exploded")

    monkeypatch.setattr(compress.LowRankStage, "run", broken)
    with pytest.raises(RuntimeError, match="stage exploded"):
        run(compose_cfg([*TINY_LLAMA, "method=svd", "logger=wandb"], shared_root,
                        tmp_path / "run"))
    assert wandb.run is None
