"""Every config choice composes, and its _target_ objects instantiate (no real work)."""

import pytest
from hydra.utils import instantiate

from conftest import CONFIGS, compose_cfg

GROUPS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml"))
          for g in ("model", "method", "dataset", "trainer", "logger", "experiment")}
CHOICES = [(g, c) for g, options in GROUPS.items() for c in options]


@pytest.mark.parametrize(("group", "choice"), CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_choice_composes(group, choice, tmp_path):
    cfg = compose_cfg([f"{group}={choice}"], tmp_path)
    assert cfg.model.name and cfg.dataset.name and cfg.method.name
    if group == "model":
        source = instantiate(cfg.model.source)
        assert source.modality in ("text", "image", "matrix")
    if group == "dataset":
        assert instantiate(cfg.dataset.datamodule).modality
    if group == "method":
        for name, stage in (cfg.method.stages or {}).items():
            assert instantiate(stage) is not None, name
    if group == "trainer":
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_run_name_and_tags_come_from_choices(tmp_path):
    cfg = compose_cfg(["method=svd", "method.ratio=0.2", "seed=3"], tmp_path)
    assert cfg.run_name == "svd-llama-pycode-r0.2-s3"
    cfg = compose_cfg(["method=none"], tmp_path)
    assert cfg.run_name == "none-llama-pycode-s0"


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_slurm", "submitit_local"])
def test_hydra_launchers_compose(launcher):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    assert "Launcher" in cfg.hydra.launcher._target_


def test_experiment_presets_override_top_level_keys(tmp_path):
    cfg = compose_cfg(["experiment=dln_factorization"], tmp_path)
    assert cfg.group == "dln_factorization" and cfg.save_model is False
