"""docs/extending.md, run: a new method added as one folder (its stage) and one config,
outside the package and without editing a line of it, then run end to end with
``run.py``; its compressed model saves and loads like any other."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import compresslab
from compresslab.layers import LowRankLinear
from conftest import QUIET, REPO, TINY_LLAMA, compose_cfg

STAGE = '''
"""Toy method: every attention/MLP linear factorised at half its full rank."""
from compresslab.compress.lowrank import truncated_svd_factors
from compresslab.errors import ConfigError
from compresslab.layers import LowRankLinear
from compresslab.models.utils import set_module
from compresslab.stages.base import Stage


class HalfRankStage(Stage):
    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction

    def check(self, model, ctx):
        if not 0 < self.fraction < 1:
            raise ConfigError(f"{self.name}: fraction must be in (0, 1), got {self.fraction}")

    def run(self, model, ctx):
        for name, layer in ctx.adapter.compressible_linears(model).items():
            rank = max(1, int(self.fraction * min(layer.weight.shape)))
            left, right = truncated_svd_factors(layer.weight, rank)
            new = LowRankLinear.from_factors(left, right, layer.bias)
            set_module(model, name, new)
            ctx.plan[name] = new.plan_entry()        # the layer writes its own saved form
        ctx.log({f"{self.name}/layers": len(ctx.plan)})
        return model
'''

CONFIG = '''
# Toy method (docs/extending.md): half-rank SVD of every attention/MLP linear.
name: half_rank
models: [llama, vit, ar_image]      # model families it runs on
fraction: 0.5
stages:
  compress:
    _target_: half_rank.stage.HalfRankStage
    fraction: ${method.fraction}
'''


def add_toy_method(root):
    """The two files a new method needs, in a folder of the user's own."""
    package = root / "half_rank"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text(textwrap.dedent(STAGE))
    (root / "configs" / "method").mkdir(parents=True)
    (root / "configs" / "method" / "half_rank.yaml").write_text(textwrap.dedent(CONFIG))


def run_toy(root, shared_root, *extra):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    args = ["method=half_rank", f"hydra.searchpath=[file://{root / 'configs'}]",
            f"paths.root={shared_root}", f"hydra.run.dir={root / 'run'}", *TINY_LLAMA,
            *QUIET, "threads=1", *extra]
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_toy_method_is_one_folder_and_one_config(tmp_path, shared_root):
    add_toy_method(tmp_path)
    done = run_toy(tmp_path, shared_root)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["compress/layers"] == 14 and metrics["test/ppl"] > 1   # 2 blocks x 7
    model = compresslab.load_compressed(tmp_path / "run" / "compressed")
    factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(factored) == 14
    assert all(m.rank == min(m.in_features, m.out_features) // 2 for m in factored.values())
    plan = json.loads((tmp_path / "run" / "compressed" / "plan.json").read_text())
    assert {e["kind"] for e in plan["layers"].values()} == {"lowrank"}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_toy_methods_bad_setting_is_refused_before_work(tmp_path, shared_root, monkeypatch):
    from compresslab.errors import ConfigError
    from compresslab.pipeline import run

    add_toy_method(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_cfg(["method=half_rank", "method.fraction=2", *TINY_LLAMA,
                       f"hydra.searchpath=[file://{tmp_path / 'configs'}]"],
                      shared_root, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^compress: fraction must be in \(0, 1\), got 2$"):
        run(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()
