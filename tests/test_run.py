"""End to end: ``python run.py`` on tiny settings writes the metrics it promises."""

import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from compresslab import load_compressed
from compresslab.models.architecture import adapter_for
from compresslab.pipeline import run
from compresslab.resume import reproducible_metrics
from compresslab.stages.modules import EvalModule
from conftest import TINY_LLAMA, TINY_VIT, compose_cfg, read_metrics, run_cli


@pytest.mark.parametrize("model_args", [TINY_LLAMA, TINY_VIT], ids=["llama_tiny", "vit_tiny"])
def test_run_py_svd_end_to_end(model_args, shared_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["method=svd", "method.ratio=0.4", "logger=csv", "progress=false",
                      f"paths.root={shared_root}", f"hydra.run.dir={run_dir}", *model_args])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    metric = "ppl" if "dataset=pycode" in model_args else "acc"
    for key in (f"test/{metric}", f"dense/test_{metric}", "params/dense", "params/compressed",
                "compress/params_ratio", "compress/model_params_ratio", "compress/time_s",
                "time/total_s"):
        assert key in metrics, key
    assert abs(metrics["compress/params_ratio"] - 0.4) <= 0.01
    assert metrics["params/compressed"] < metrics["params/dense"]
    assert "dense vs compressed" in result.stdout
    # the header and run_info.json say which dataset and base model were used, and why
    dataset = "pycode" if "dataset=pycode" in model_args else "digits"
    assert f"dataset: {dataset} (given on the command line)" in result.stdout
    choices = json.loads((run_dir / "run_info.json").read_text())["choices"]
    assert choices["dataset"] == dataset
    assert choices["dataset_reason"] == "given on the command line"
    assert choices["base_model"].startswith("embedded model")
    # the same keys went to the logger
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert f"test/{metric}" in logged and "compress/params_ratio" in logged
    # the compressed model reloads from safetensors + plan with identical outputs
    plan = json.loads((run_dir / "compressed" / "plan.json").read_text())
    assert all(e["kind"] == "lowrank" for e in plan["layers"].values())
    assert load_compressed(run_dir / "compressed") is not None


def test_base_model_is_cached_and_reused(shared_root, tmp_path):
    cfg = compose_cfg([*TINY_LLAMA, "method=none"], shared_root, tmp_path / "a")
    first = run(cfg)
    cfg = compose_cfg([*TINY_LLAMA, "method=none"], shared_root, tmp_path / "b")
    second = run(cfg)
    assert second["base/cached"] == 1
    assert first["dense/test_ppl"] == pytest.approx(second["dense/test_ppl"], rel=1e-12)
    assert second["test/ppl"] == second["dense/test_ppl"]


def test_reloaded_compressed_model_matches_run(shared_root, tmp_path):
    cfg = compose_cfg([*TINY_LLAMA, "method=svd", "method.ratio=0.5"], shared_root,
                      tmp_path / "run")
    metrics = run(cfg)
    model = load_compressed(tmp_path / "run" / "compressed")
    data = instantiate(cfg.dataset.datamodule)
    data.load()
    module = EvalModule(model, adapter_for(model), data.task)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, dataloaders=data.eval_dataloader("test"), verbose=False)
    assert module.result["ppl"] == pytest.approx(metrics["test/ppl"], rel=1e-6)


def test_full_rank_compression_keeps_model_outputs(shared_root, tmp_path):
    """Explicit rank = full rank for every layer: perplexity unchanged."""
    cfg = compose_cfg([*TINY_LLAMA, "method=svd", "method.rank=64",
                       "method.stages.compress.roles=[q,k,v,o]"], shared_root, tmp_path / "r")
    metrics = run(cfg)
    assert metrics["test/ppl"] == pytest.approx(metrics["dense/test_ppl"], rel=1e-4)
    assert torch.isfinite(torch.tensor(metrics["test/ppl"]))


def test_base_pretrained_on_another_dataset_shares_its_tokenizer(shared_root, tmp_path):
    """dataset@pretrain_data=pycode: the base is the pycode model (same cache entry as a
    plain pycode run) and the run's own text is tokenized with pycode's tokenizer."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400)))
    pre = ["dataset@pretrain_data=pycode"] + [
        a.replace("dataset.", "pretrain_data.", 1) for a in TINY_LLAMA if a.startswith("dataset.")]
    own = [a for a in TINY_LLAMA if not a.startswith("dataset")]
    cfg = compose_cfg([*own, *pre, "dataset=text_files", f"dataset.train={corpus}",
                       f"dataset.val={corpus}", f"dataset.test={corpus}",
                       "dataset.datamodule.block_size=64", "method=none"],
                      shared_root, tmp_path / "run")
    metrics = run(cfg)
    plain = run(compose_cfg([*TINY_LLAMA, "method=none"], shared_root, tmp_path / "plain"))
    assert plain["base/cached"] == 1
    assert metrics["base/test/ppl"] == pytest.approx(plain["base/test/ppl"], rel=1e-12)
    assert metrics["test/ppl"] != plain["test/ppl"]  # evaluated on the run's own text
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["data"]["vocab_size"] <= 512 and info["data"]["corpus"] == "text_files"


def test_same_config_and_seed_give_identical_metrics(shared_root, tmp_path):
    runs = [run(compose_cfg([*TINY_LLAMA, "method=svd", "method.ratio=0.6"], shared_root,
                            tmp_path / name)) for name in ("a", "b")]


    # wall times differ; the first run may have pre-trained the base (README, "Resume and
    # faults": the documented rule)
    assert reproducible_metrics(runs[0]) == reproducible_metrics(runs[1])
    assert reproducible_metrics(read_metrics(tmp_path / "a")) == \
        reproducible_metrics(read_metrics(tmp_path / "b"))


@pytest.mark.parametrize("method", ["svd_llm", "asvd"])
def test_calibrated_svd_methods_run_on_vit(method, shared_root, tmp_path):
    # image datasets serve (images, labels): calibration must feed the model the images
    from compresslab.pipeline import run

    cfg = compose_cfg([*TINY_VIT, f"method={method}", "method.ratio=0.4",
                       "method.calibration.num_samples=16"], shared_root, tmp_path / "run")
    metrics = run(cfg)
    assert abs(metrics["compress/params_ratio"] - 0.4) <= 0.01
    assert 0 <= metrics["test/acc"] <= 1
