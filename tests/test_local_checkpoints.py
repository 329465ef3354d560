"""Real checkpoints from local paths: an HF LLaMA folder and a timm ViT weights file."""

import pytest
import torch
from safetensors.torch import save_file

from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.models.vit import TimmViT
from compresslab.pipeline import run
from conftest import TINY_LLAMA, compose_cfg


@pytest.fixture(scope="module")
def hf_llama_folder(tmp_path_factory):
    """A tiny LlamaForCausalLM saved with save_pretrained, with its own fast tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from compresslab.data.text import EOS, train_bpe

    folder = tmp_path_factory.mktemp("hf_llama")
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 50, "import os\nprint(os.sep)\n" * 50],
                    300)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_hf_checkpoint_runs_svd_with_its_own_tokenizer(hf_llama_folder, tmp_path):
    data_args = [a for a in TINY_LLAMA if a.startswith("dataset.")]
    cfg = compose_cfg(["model=llama", f"model.path={hf_llama_folder}", "method=svd",
                       "method.ratio=0.3", *data_args], tmp_path, tmp_path / "run")
    metrics = run(cfg)
    assert metrics["base/cached"] == 0 and not (tmp_path / "base").exists()  # used as loaded
    assert abs(metrics["compress/params_ratio"] - 0.3) < 0.02
    assert metrics["test/ppl"] > 1 and metrics["dense/test_ppl"] > 1
    info = (tmp_path / "run" / "run_info.json").read_text()
    assert str(hf_llama_folder) in info  # the checkpoint's tokenizer identity


def test_timm_vit_loads_local_weights_and_reinitialises_a_foreign_head(tmp_path):
    import timm

    kwargs = {"patch_size": 2, "embed_dim": 32, "depth": 1, "num_heads": 2}
    donor = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5,
                              in_chans=1, img_size=8, **kwargs)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    source = TimmViT(weights=str(path), kwargs=kwargs)
    source.check()
    model = source.build(DataSpec("image", num_classes=10, image_size=8, channels=1))
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, donor.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (10, 32)
    torch.save(donor.state_dict(), tmp_path / "vit.pth")  # weights-only .pth works too
    TimmViT(weights=str(tmp_path / "vit.pth"), kwargs=kwargs).build(
        DataSpec("image", num_classes=5, image_size=8, channels=1))
    wrong = TimmViT(weights=str(path), kwargs={**kwargs, "embed_dim": 48, "num_heads": 2})
    with pytest.raises(ConfigError, match="does not fit timm model"):
        wrong.build(DataSpec("image", num_classes=10, image_size=8, channels=1))
