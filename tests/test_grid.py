"""The generic grid runner (compresslab.grid): every paper's grid builds its commands,
skips finished cells and prints a dry run; one tiny grid runs end to end into a table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from compresslab.errors import ConfigError
from compresslab.grid import cells, commands, load_grid, main
from conftest import REPO, TINY_LLAMA

PAPERS = ["numprune", "spectrum", "pela", "peft"]


def grid_of(paper: str, variant: str | None = None) -> dict:
    return load_grid(REPO / "experiments" / paper / "grid.yaml", variant)


def finish(folder, metrics=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics or {}))


def overrides(cmd: list[str]) -> list[str]:
    return cmd[2:]


@pytest.mark.parametrize("paper", PAPERS)
def test_every_paper_grid_has_a_table_script_and_make_lines(paper):
    grid = grid_of(paper)
    assert (REPO / "configs" / "experiment" / f"{grid['experiment']}.yaml").is_file()
    assert (REPO / "experiments" / paper / "table.py").is_file()
    assert not (REPO / "experiments" / paper / "sweep.py").exists()
    assert "compresslab.grid" in (REPO / "Makefile").read_text()
    assert f"experiments/{paper}/grid.yaml" in (REPO / "experiments" / paper
                                                 / "targets.mk").read_text()


@pytest.mark.parametrize("paper", PAPERS)
def test_commands_cover_every_cell_once_and_skip_finished_ones(paper, tmp_path):
    grid = grid_of(paper)
    todo = cells(grid, tmp_path)
    cmds = commands(grid, todo, ["x=1"], python="py")
    assert all(cmd[:2] == ["py", str(REPO / "run.py")] for cmd in cmds)
    assert all(f"experiment={grid['experiment']}" in cmd and "x=1" in cmd for cmd in cmds)
    folders = {c.folder for c in todo}
    assert len(folders) == len(todo), "two cells share a folder"
    # one command per (setting, row): every cell still to run
    assert len(cmds) == len({(c.setting, c.row) for c in todo})
    for cell in todo:
        finish(cell.folder)
    assert commands(grid, todo, python="py") == []


def test_numprune_cells_sweep_base_and_calibration_seeds(tmp_path):
    grid = grid_of("numprune")
    todo = cells(grid, tmp_path, settings=["llama_tiny"], rows=["dense", "numerical_global"],
                 values={"ratio": [0.3, 0.5], "base_seed": [0, 1, 2]})
    names = sorted(str(c.folder.relative_to(tmp_path)) for c in todo)
    assert names[:3] == ["llama_tiny/dense/b0", "llama_tiny/dense/b1", "llama_tiny/dense/b2"]
    assert "llama_tiny/numerical_global/r0.5-b2-c0" in names and len(names) == 3 + 6
    finish(tmp_path / "llama_tiny/numerical_global/r0.3-b1-c0")
    cmds = commands(grid, todo, python="py")
    dense = overrides(cmds[0])
    assert "method=none" in dense and "model.pretrain.seed=0,1,2" in dense
    assert not any(o.startswith("method.ratio") for o in dense)
    # 5 cells left are no full product: one multirun per base seed over its missing ratios
    numerical_cmds = [overrides(c) for c in cmds[1:]]
    assert len(numerical_cmds) == 3 and all(c[0] == "-m" for c in numerical_cmds)
    swept = sorted((next(o for o in c if o.startswith("model.pretrain.seed=")),
                    next(o for o in c if o.startswith("method.ratio="))) for c in numerical_cmds)
    assert swept == [("model.pretrain.seed=0", "method.ratio=0.3,0.5"),
                     ("model.pretrain.seed=1", "method.ratio=0.5"),
                     ("model.pretrain.seed=2", "method.ratio=0.3,0.5")]
    assert all("method.allocation=global" in c and "variant=numerical_global" in c
               and "group=numprune" in c and "method.calibration.seed=0" in c
               for c in numerical_cmds)
    assert numerical_cmds[0][-1] == ("hydra.sweep.subdir=r${method.ratio}-b"
                                     "${model.pretrain.seed}-c${method.calibration.seed}")


def test_variants_and_row_specific_axes():
    quick = grid_of("spectrum", "quick")
    assert quick["axes"]["ratio"]["values"] == [0.8, 0.4]
    assert "method.stages.spectrum.max_steps=20" in quick["rows"]["spectrum"]["overrides"]
    assert quick["rows"]["svd"]["axes"] == {"calib_seed": None}     # kept from the grid
    pela = cells(grid_of("pela"), REPO / "out", settings=["llama_tiny"], rows=["lra"])
    assert sorted(c.values["ratio"] for c in pela) == [0.5, 0.5, 0.5]   # the setting's own
    small = grid_of("numprune", "small")
    assert set(small["settings"]) == {"llama_tiny_small", "ar_image"}


def test_extra_overrides_come_before_a_rows_own(tmp_path):
    grid = grid_of("pela")
    cmd = commands(grid, cells(grid, tmp_path, settings=["vit_tiny"], rows=["dense"]),
                   ["method.stages.pretrain.max_steps=5"], python="py")[0]
    assert cmd.index("method.stages.pretrain.max_steps=5") < cmd.index(
        "method.stages.pretrain=null")


def test_bad_names_are_one_line_errors(tmp_path, capsys):
    grid = grid_of("numprune")
    with pytest.raises(ConfigError, match="unknown rows nope"):
        cells(grid, tmp_path, rows=["nope"])
    with pytest.raises(ConfigError, match="no axis 'seed'"):
        cells(grid, tmp_path, values={"seed": [0]})
    assert main([str(REPO / "experiments/numprune/grid.yaml"), "--out", str(tmp_path),
                 "--variant", "nope"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    finish(tmp_path / "llama_tiny" / "wanda" / "r0.3-b0-c0")
    code = main([str(REPO / "experiments/numprune/grid.yaml"), "--out", str(tmp_path),
                 "--settings", "llama_tiny", "--rows", "wanda,flap", "--ratios", "0.3",
                 "--base-seeds", "0", "--dry-run", "--", "threads=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"= {tmp_path}/llama_tiny/wanda/r0.3-b0-c0 already finished" in out
    assert "2 cells, 1 finished, 1 command(s) to run" in out
    lines = [line for line in out.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1 and "method=flap" in lines[0] and "threads=2" in lines[0]
    assert not (tmp_path / "llama_tiny" / "flap").exists()


def test_a_tiny_grid_end_to_end_through_the_runner_and_the_table(shared_root, tmp_path):
    """Two cells (numerical pruning at 30% on two tiny base models) through the real runner
    and experiments/numprune/table.py; a second run skips both."""
    grid = {"experiment": "numprune", "group": "numprune", "row_key": "variant",
            "common": ["progress=false", "print_table=false", "logger=none", "threads=1",
                       f"paths.root={shared_root}"],
            "settings": {"tiny": TINY_LLAMA},
            "axes": {"ratio": {"key": "method.ratio", "prefix": "r", "values": [0.3]},
                     "base_seed": {"key": "model.pretrain.seed", "prefix": "b",
                                   "values": [0, 1]}},
            "rows": {"numerical_global": {"overrides": [
                "method=numerical_pruning", "method.allocation=global", "eval.dense=false",
                "method.stages.prune.latency_repeats=2"]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = [sys.executable, "-m", "compresslab.grid", str(path), "--out", str(out)]
    first = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for seed in (0, 1):
        metrics = json.loads((out / "tiny" / "numerical_global" / f"r0.3-b{seed}" /
                              "metrics.json").read_text())
        assert metrics["prune/speedup"] > 0 and "prune/score_cond_max" in metrics
    again = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "2 cells, 2 finished, 0 command(s) to run" in again.stdout
    table = subprocess.run([sys.executable, str(REPO / "experiments/numprune/table.py"),
                            "--runs", str(out), "--tables", str(tmp_path / "tables")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    text = (tmp_path / "tables" / "numprune.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 30% |"))
    assert " ± " in row and "**" not in row       # two base models; nothing to beat
    assert "| numerical (global, the paper's) | 30% | 2 |" in text


def make_lines(*args: str) -> str:
    result = subprocess.run(["make", "-n", "-o", "install", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.replace("\\\n", " ").split())


@pytest.mark.parametrize("paper", ["numprune", "spectrum", "pela"])
def test_table_targets_take_base_seeds_and_quick_ones_default_to_one(paper):
    assert "--base-seeds 0,1,2" in make_lines(f"table-{paper}")
    assert "--base-seeds 0 " in make_lines(f"table-{paper}-quick") + " "
    assert "--base-seeds 3,4" in make_lines(f"table-{paper}-quick", "BASE_SEEDS=3,4")
    if paper != "pela":     # PELA has no calibration draw
        assert "--calib-seeds 0" in make_lines(f"table-{paper}")
