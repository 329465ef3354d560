"""The method x model matrix: every supported pair runs end to end on tiny settings, every
refused pair stops before any work with one line, and the README shows the same matrix."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from compresslab.errors import ConfigError
from compresslab.matrix import FAMILIES, embedded_block, markdown, support
from compresslab.pipeline import run
from conftest import REPO, TINY_LLAMA, TINY_VIT, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

_SMALL_LLAMA = [a for a in TINY_LLAMA if not a.startswith(("model=", "dataset="))]
#: each family by the name users type, with tiny settings; no dataset= (the model picks it)
FAMILY_ARGS = {
    "llama": ["model=llama", *_SMALL_LLAMA],
    "vit": ["model=vit", *[a for a in TINY_VIT if not a.startswith(("model=", "dataset="))]],
    "ar_image": ["model=ar_image", "model.source.hidden_size=64",
                 "model.source.intermediate_size=176", "model.source.num_layers=2",
                 "model.pretrain.max_steps=30"],
    "dln": ["model=dln", "dataset.datamodule.d=12", "dataset.datamodule.r=2"],
    "mlp": ["model=mlp", "model.source.hidden=[32]"],
}
#: option names shrunk wherever they occur in a method's config: seconds per pair
TINY_METHOD = {"max_steps": 3, "finetune_steps": 2, "num_samples": 8, "batch_size": 4,
               "latency_repeats": 1, "latency_samples": 4, "every_n_steps": 1,
               "checkpoint_every": None}

PAIRS = [(m, f) for m, families in support().items() for f in families]
REFUSED = [(m, f) for m, families in support().items() for f in FAMILIES if f not in families]


def shrink(node) -> None:
    """Set every :data:`TINY_METHOD` option found below ``node`` to its tiny value."""
    if isinstance(node, DictConfig):
        for key in list(node.keys()):
            if key in TINY_METHOD and not OmegaConf.is_missing(node, key):
                node[key] = TINY_METHOD[key]
            else:
                shrink(node._get_node(key))
    elif OmegaConf.is_list(node):
        for item in node:
            shrink(item)


def tiny_cfg(method: str, family: str, root, run_dir):
    cfg = compose_cfg([f"method={method}", *FAMILY_ARGS[family], "save_model=false"],
                      root, run_dir)
    with open_dict(cfg):
        shrink(cfg.method)
    return cfg


@pytest.mark.parametrize(("method", "family"), PAIRS, ids=[f"{m}-{f}" for m, f in PAIRS])
def test_supported_pair_runs(method, family, shared_root, tmp_path):
    cfg = tiny_cfg(method, family, shared_root, tmp_path / "run")
    assert cfg.model.family == family
    metrics = run(cfg)
    metric = cfg.dataset.metric
    value = metrics[f"test/{metric}"]
    assert value == value, f"test/{metric} is NaN"   # NaN != NaN
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize(("method", "family"), REFUSED, ids=[f"{m}-{f}" for m, f in REFUSED])
def test_refused_pair_stops_before_work(method, family, tmp_path):
    cfg = compose_cfg([f"method={method}", *FAMILY_ARGS[family]], tmp_path, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert f"method={method} does not run on model={family}" in message
    for supported in support()[method]:
        assert f"model={supported}" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "base").exists()


def test_readme_matrix_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    assert embedded_block(readme) == markdown()


def test_every_family_picks_its_own_dataset(tmp_path):
    expected = {"llama": "pycode", "vit": "digits", "dln": "matrix_factorization",
                "mlp": "digits", "ar_image": "digit_tokens"}
    for family, dataset in expected.items():
        assert compose_cfg([f"model={family}"], tmp_path).dataset.name == dataset
    # a dataset named explicitly wins, and a wrong pair keeps its one-line error
    cfg = compose_cfg(["model=vit", "dataset=pycode", "method=none"], tmp_path)
    assert cfg.dataset.name == "pycode"
    with pytest.raises(ConfigError, match=r"model=vit \(image\) cannot run on dataset=pycode"):
        run(cfg)


def test_family_names_load_local_checkpoints_when_given(tmp_path):
    from hydra.utils import instantiate

    from compresslab.models.llama import LocalHFCausalLM, TinyLlama
    from compresslab.models.vit import TimmViT, TinyViT

    def source(overrides):
        cfg = compose_cfg(overrides, tmp_path)
        return cfg, instantiate(cfg.model.source)

    cfg, built = source(["model=llama", "model.path=/ckpt"])
    assert isinstance(built, LocalHFCausalLM) and built.path == "/ckpt"
    assert cfg.model.pretrain.max_steps == 0            # a checkpoint is used as loaded
    cfg, built = source(["model=llama"])
    assert isinstance(built, TinyLlama) and cfg.model.pretrain.max_steps > 0
    cfg, built = source(["model=vit", "model.weights=/w.safetensors"])
    assert isinstance(built, TimmViT) and built.weights == "/w.safetensors"
    assert cfg.model.pretrain.max_steps == 0 and cfg.model.pretrain.optim.lr == 1e-4
    cfg, built = source(["model=vit"])
    assert isinstance(built, TinyViT) and cfg.model.pretrain.max_steps > 0
    # the explicit small names are the same models and share one cached base
    from compresslab.base_cache import model_identity

    assert model_identity(compose_cfg(["model=llama_tiny"], tmp_path)) == \
        model_identity(compose_cfg(["model=llama"], tmp_path))


def test_header_says_the_dataset_follows_the_model(shared_root, tmp_path):
    """``python run.py model=vit`` (no dataset=): the header names digits and why."""
    from conftest import read_metrics, run_cli

    vit = [a for a in FAMILY_ARGS["vit"] if a != "model=vit"]
    result = run_cli(["method=none", "model=vit", *vit, "logger=none", "progress=false",
                      f"paths.root={shared_root}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dataset: digits (the default dataset of model=vit)" in result.stdout
    assert "test/acc" in read_metrics(tmp_path / "run")
