"""Shared fixtures: tiny model settings, config composition, a shared output root."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Small enough to pre-train in seconds; 64-wide so that ratio 0.4 is reachable within 1%.
TINY_LLAMA = ["model=llama_tiny", "dataset=pycode", "model.source.hidden_size=64",
              "model.source.intermediate_size=176", "model.source.num_layers=2",
              "model.pretrain.max_steps=40", "dataset.datamodule.max_files=30",
              "dataset.datamodule.vocab_size=512", "dataset.datamodule.max_eval_blocks=16",
              "dataset.datamodule.block_size=64"]
TINY_VIT = ["model=vit_tiny", "dataset=digits", "model.source.depth=2",
            "model.pretrain.max_steps=60"]
QUIET = ["logger=none", "progress=false", "print_table=false"]


def load_script(path: str, name: str):
    """A script of the repository (``path`` relative to it, e.g.
    ``experiments/spectrum/table.py``) imported as the module ``name``; registered in
    ``sys.modules`` because dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compose_cfg(overrides: list[str], root: Path, run_dir: Path | None = None):
    """The real configs composed with ``overrides``, writing below ``root``."""
    from hydra import compose, initialize_config_dir

    import compresslab  # noqa: F401  (resolvers)

    run_dir = run_dir or root / "run"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", f"run_dir={run_dir}",
                                            *QUIET, *overrides])


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` as a user would, in a subprocess."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def fitting(trainer, folder_suffix: str) -> bool:
    """Whether ``trainer`` fits the stage (or phase) whose checkpoint folder ends with
    ``folder_suffix`` (e.g. ``00-train``, ``finetune/left``): not the base model's
    pre-training, which a test run whose base model is not cached yet does first."""
    return any(str(callback.dirpath).endswith(folder_suffix)
               for callback in trainer.callbacks if getattr(callback, "dirpath", None))


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """An outputs root shared by the whole session, so base models train once."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread avoids thread contention on a shared CPU
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
