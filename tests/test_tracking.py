"""Experiment tracking read back from what a run really wrote: an offline W&B run's
record file, CSV curves, weight-file modes, the --help page, progress bar names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from compresslab.pipeline import run
from conftest import TINY_VIT, compose_cfg, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINED = ("base_pretrain", "pretrain", "finetune")
# PELA on a 2-block ViT: every stage short; the fine-tune validates (val curves)
PELA_TINY = [*TINY_VIT, "model.pretrain.max_steps=30", "model.pretrain.log_every=5",
             "method=pela", "method.stages.pretrain.max_steps=20",
             "method.stages.pretrain.log_every=5",
             "method.stages.pretrain.callbacks.0.every_n_steps=10",
             "method.stages.finetune.max_steps=20", "method.stages.finetune.log_every=5",
             "method.stages.finetune.val_every=10"]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """One finished offline W&B run of PELA (base pre-trained in the run), read back from
    its ``.wandb`` file; also its run folder and metrics."""
    from compresslab.stages import train

    root = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_DIR", str(root))
    # every fit also records the loss its training_step returned, per step
    recorded: dict[str, dict[int, float]] = {}
    add_grad_norms = train.with_grad_norms
    mp.setattr(train, "with_grad_norms",
               lambda cbs: [*add_grad_norms(cbs), LossRecorder(recorded)])
    try:
        cfg = compose_cfg([*PELA_TINY, "logger=wandb", "logger.mode=offline"], root,
                          root / "run")
        metrics = run(cfg)
    finally:
        mp.undo()
    metrics["recorded"] = recorded
    return read_back(root / "run"), root / "run", metrics


class LossRecorder:
    """Lightning callback (duck-typed): ``recorded[stage][step]`` = the training loss."""

    def __new__(cls, recorded):
        import lightning as L

        class Recorder(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                stage = trainer.logger.prefix
                step = trainer.global_step - 1  # the step that just ran (0-based)
                recorded.setdefault(stage, {})[step] = float(outputs["loss"])

        return Recorder()


def read_back(run_dir: Path):
    """The offline W&B run of ``run_dir``, once the service has written all of it."""
    import wandb

    from compresslab.wandb_offline import read_run

    wandb.teardown()  # the service writes the run file's last records after finish()
    return read_run(next((run_dir / "wandb").glob("offline-run-*")))


def step_values(wb, key: str) -> list:
    """The step of every logged value of ``key``: its defined step metric, else _step."""
    step_key = (wb.metrics.get(key) or {}).get("step_metric") or "_step"
    return [row.get(step_key) for row in wb.history if key in row]


def test_full_config_and_job_type_reach_wandb(wandb_run):
    wb, _, _ = wandb_run
    assert wb.config["method"]["ratio"] == 0.5 and wb.config["method"]["name"] == "pela"
    assert wb.config["model"]["name"] == "vit_tiny" and wb.config["seed"] == 0
    assert wb.config["method"]["stages"]["pretrain"]["optim"]["lr"] == 1e-3
    assert wb.job_type == "pela" and set(wb.tags) == {"pela", "vit_tiny", "digits"}


@pytest.mark.parametrize("stage", TRAINED)
def test_each_trained_stage_has_its_own_step_loss_lr_and_grad_norm(wandb_run, stage):
    wb, _, _ = wandb_run
    for curve in ("train/loss", "train/lr", "train/grad_norm"):
        key = f"{stage}/{curve}"
        assert wb.metrics[key]["step_metric"] == f"{stage}/step", key
        steps = step_values(wb, key)
        assert len(steps) >= 3 and steps[0] >= 0, (key, steps)
    assert wb.metrics[f"{stage}/train/loss"]["summary"] == ["min"]
    lrs = [v for _, v in wb.series(f"{stage}/train/lr", f"{stage}/step")]
    assert all(v > 0 for v in lrs)


def test_validation_curve_where_the_stage_validates(wandb_run):
    wb, _, _ = wandb_run
    # Lightning's 0-based step of the batch that triggered it, as for train/loss
    assert step_values(wb, "finetune/val/acc") == [9, 19]
    assert wb.metrics["finetune/val/acc"]["summary"] == ["max"]
    assert not any(k.startswith("pretrain/val/") for row in wb.history for k in row)


def test_no_key_has_overlapping_step_ranges(wandb_run):
    """Every key logged more than once moves strictly forward along its step metric (the
    old shared ``train/loss`` vs ``trainer/global_step`` went back to 0 at each stage)."""
    wb, _, _ = wandb_run
    keys = {k for row in wb.history for k in row if not k.startswith("_")}
    for key in keys:
        steps = step_values(wb, key)
        if len(steps) > 1:
            assert None not in steps and steps == sorted(set(steps)), (key, steps)
    assert "train/loss" not in keys


def test_logged_losses_are_the_losses_each_stage_trained_on(wandb_run):
    """Each logged ``<stage>/train/loss`` is the loss that stage's training step computed at
    that step: no value from another stage or step under a stage's curve."""
    wb, _, metrics = wandb_run
    for stage in TRAINED:
        logged = wb.series(f"{stage}/train/loss", f"{stage}/step")
        trained = metrics["recorded"][stage]
        assert logged and all(v == pytest.approx(trained[s], rel=1e-6) for s, v in logged)


def test_last_logged_base_loss_agrees_with_the_final_base_model(wandb_run):
    """The base curve's last point (the loss before the last update) and the final base
    weights on the training split tell the same story (the issue's 7.68 vs <= 0.0017)."""
    import json

    from hydra.utils import instantiate

    from compresslab.data.digits import DigitsDataModule
    from compresslab.models.architecture import adapter_for
    from compresslab.weights_io import load_state

    wb, run_dir, _ = wandb_run
    folder = next(p for p in (run_dir.parent / "base").glob("*-digits-*") if p.is_dir())
    record = json.loads((folder / "base.json").read_text())
    data = DigitsDataModule()
    data.load()
    model = instantiate(record["model"]["source"]).build(data.spec()).eval()
    load_state(model, folder / "model.safetensors")
    images, labels = data.split("train").tensors
    with torch.no_grad():
        train_loss = float(data.task.loss(model, adapter_for(model), (images, labels)))
    last_step, last_loss = wb.series("base_pretrain/train/loss", "base_pretrain/step")[-1]
    assert last_step == 29
    assert abs(last_loss - train_loss) < 0.25, (last_loss, train_loss)


def test_results_table_and_singular_value_png_are_logged(wandb_run):
    wb, _, metrics = wandb_run
    assert any(f.startswith("media/table/results_") for f in wb.files)
    assert any(f.startswith("media/images/pretrain/sv/plot_") for f in wb.files)
    rows = [r for r in wb.history if "results/_type" in r]
    assert rows and rows[0]["results/_type"] == "table-file" and rows[0]["results/nrows"] >= 3
    assert not wb.artifacts or all("model" not in a for a in wb.artifacts)  # log_model off


def test_model_artifact_when_asked(tmp_path, monkeypatch):
    """``logger.log_model=true``: the ``compressed/`` folder becomes a model artifact."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_cfg([*TINY_VIT, "model.pretrain.max_steps=10", "method=svd",
                       "logger=wandb", "logger.mode=offline", "logger.log_model=true"],
                      tmp_path, tmp_path / "run")
    run(cfg)
    wb = read_back(tmp_path / "run")
    assert any(name.startswith(cfg.run_name) for name in wb.artifacts), wb.artifacts


def test_csv_gets_the_config_and_prefixed_curves(tmp_path):
    import csv

    import yaml

    cfg = compose_cfg([*TINY_VIT, "model.pretrain.max_steps=20", "model.pretrain.log_every=5",
                       "method=svd", "logger=csv"], tmp_path, tmp_path / "run")
    run(cfg)
    hparams = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert hparams["method"]["name"] == "svd" and hparams["model"]["name"] == "vit_tiny"
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for curve in ("loss", "lr", "grad_norm"):
        key = f"base_pretrain/train/{curve}"
        assert [int(r["base_pretrain/step"]) for r in rows if r.get(key)] == [4, 9, 14, 19]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_weight_files_follow_the_umask(tmp_path, mask):
    from torch import nn

    from compresslab.weights_io import save_state

    before = os.umask(mask)
    try:
        save_state(nn.Linear(2, 2), tmp_path / "w.safetensors")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~mask


def test_help_starts_with_a_description_and_examples():
    out = run_cli(["--help"], timeout=120).stdout
    assert out.startswith("compresslab: compress a pre-trained model")
    assert "python run.py method=pela model=vit" in out and "python run.py -m " in out
    assert "make table-pela" in out and "python -m compresslab.compare" in out
    assert "method: " in out and len(out.splitlines()) < 40  # groups, not the whole config


def test_progress_bars_are_named_by_stage():
    from compresslab.callbacks.progress import StageProgressBar

    bar = StageProgressBar("pela pretrain")
    assert bar._get_train_description(0) == "pela pretrain"
    assert bar.test_description == "pela pretrain"
    assert StageProgressBar().test_description == "Testing"


def test_stage_lines_and_pretraining_announcement(tmp_path, caplog):
    caplog.set_level("INFO", logger="compresslab")
    run(compose_cfg([*TINY_VIT, "model.pretrain.max_steps=10", "method=svd"], tmp_path))
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("pre-training the base model vit_tiny on digits: 10 steps, about ")
               for m in lines), lines
    assert "stage 1/1 compress: start" in lines
    assert any(m.startswith("stage 1/1 compress: done after ") for m in lines)


# -- sweeps and comparisons ------------------------------------------------------------------

def agent_command_lines(sweep_file: Path) -> list[list[str]]:
    """The command lines ``wandb agent`` starts for a grid sweep: every combination of the
    parameters through wandb's own argument builder and the file's ``command`` template."""
    import itertools

    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load(sweep_file.read_text())
    names = list(spec["parameters"])
    choices = [p["values"] if "values" in p else [p["value"]] for p in spec["parameters"].values()]
    lines = []
    for combo in itertools.product(*choices):
        made = create_sweep_command_args({"args": {n: {"value": v}
                                                   for n, v in zip(names, combo)}})
        made.update(env=["/usr/bin/env"], interpreter=["python"], program=[spec["program"]])
        lines.append([part for chunk in spec["command"] for part in
                      (made[chunk[2:-1]] if chunk.startswith("${") else [chunk])])
    return lines


def test_wandb_sweep_agent_command_lines_compose(tmp_path):
    from conftest import REPO

    lines = agent_command_lines(REPO / "sweeps" / "wandb_ratio.yaml")
    assert len(lines) == 27 and all(line[:3] == ["/usr/bin/env", "python", "run.py"]
                                    for line in lines)
    for line in lines[::8]:  # each method and ratio once (composing takes a while)
        cfg = compose_cfg(line[3:], tmp_path)
        values = dict(arg.split("=", 1) for arg in line[3:])
        assert cfg.method.name == values["method"]
        assert cfg.method.ratio == float(values["method.ratio"])
        assert cfg.seed == int(values["seed"]) and cfg.model.name == "vit_tiny"
        assert cfg.logger.mode == "online" and cfg.logger.job_type == cfg.method.name


@pytest.mark.slow  # a CLI multirun of four jobs: about a minute on 2 cores
def test_multirun_prints_one_combined_table_and_compare_reads_it(shared_root, tmp_path):
    """A Hydra multirun over two ratios and two seeds ends with one table (mean ± std over
    the seeds); ``python -m compresslab.compare`` regroups its runs; run.log has the stage
    lines."""
    import subprocess
    import sys

    from conftest import REPO

    sweep = tmp_path / "sweep"
    done = run_cli(["-m", *TINY_VIT, "method=svd", "method.ratio=0.3,0.6", "seed=0,1",
                    f"paths.root={shared_root}", f"hydra.sweep.dir={sweep}", "logger=none",
                    "progress=false", "print_table=false", "threads=1"])
    assert done.returncode == 0, done.stderr[-2000:]
    table = (sweep / "compare.md").read_text()
    assert any(line.startswith("| 0.3 | 2 | ") for line in table.splitlines())
    assert "| method.ratio | runs | test/acc | params/ratio |" in table
    assert "mean ± std over seeds" in done.stdout and table.split("\n\n", 1)[1] in done.stdout
    log = next(sweep.glob("0_*/run.log")).read_text()
    assert "stage 1/1 compress: start" in log and "stage 1/1 compress: done after" in log

    out = subprocess.run([sys.executable, "-m", "compresslab.compare", str(sweep),
                          "--by", "method,seed", "--out", str(tmp_path / "cmp")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "| method.name | seed | runs | test/acc | params/ratio |" in out.stdout
    assert out.stdout.count("| svd | ") == 2 and (tmp_path / "cmp" / "compare.md").is_file()
    assert (tmp_path / "cmp" / "compare.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "compresslab.compare", str(sweep),
                          "--by", "method.nope"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --by: no run has")


def test_compare_mean_and_std_over_seeds(tmp_path):
    """Exact aggregation on hand-made run folders: mean and sample std over seeds."""
    import json

    from compresslab.compare import compare

    for seed, acc in ((0, 0.5), (1, 0.7), (2, 0.9)):
        folder = tmp_path / f"run{seed}"
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text(
            f"seed: {seed}\nmethod: {{name: svd, ratio: 0.4}}\ndataset: {{metric: acc}}\n")
        (folder / "metrics.json").write_text(json.dumps({"test/acc": acc,
                                                         "params/ratio": 0.4}))
    text, png = compare([tmp_path], ["method", "method.ratio"])
    assert "| svd | 0.4 | 3 | 0.7 ± 0.2 | 0.4 |" in text and png.is_file()


# -- dashboards as code ----------------------------------------------------------------------

def board_keys(view) -> dict[str, set[str]]:
    """The keys a built workspace's panels read: metrics (history or summary), config
    keys, media keys."""
    import wandb_workspaces.reports.v2 as wr

    keys: dict[str, set[str]] = {"metric": set(), "config": set(), "media": set()}
    for section in view.sections:
        for panel in section.panels:
            if isinstance(panel, wr.MediaBrowser):
                keys["media"] |= set(panel.media_keys)
                continue
            for axis in (panel.x, *(panel.y if isinstance(panel.y, list) else [panel.y])):
                kind = "config" if isinstance(axis, wr.Config) else "metric"
                keys[kind].add(axis if isinstance(axis, str) else axis.name)
    return keys


def config_has(config: dict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def assert_board_matches_run(board, wb) -> None:
    from compresslab.dashboards import workspace

    keys = board_keys(workspace(board, "entity", "compresslab"))
    logged = {k for row in wb.history for k in row}
    assert keys["metric"] and keys["metric"] <= logged, keys["metric"] - logged
    assert all(config_has(wb.config, k) for k in keys["config"]), keys["config"]
    for key in keys["media"]:
        assert any(k.startswith(f"{key}/") for k in logged), key


def test_pela_dashboard_names_keys_the_runs_log(wandb_run):
    from compresslab.dashboards import BOARDS

    assert_board_matches_run(BOARDS["pela"], wandb_run[0])


def test_llama_dashboards_name_keys_the_runs_log(tmp_path, monkeypatch):
    """The spectrum and numerical-pruning boards against a learned-spectrum run on the tiny
    LLaMA (base pre-trained in the run: the run's own base folder)."""
    from compresslab.dashboards import BOARDS
    from conftest import TINY_LLAMA

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(compose_cfg([*TINY_LLAMA, "model.pretrain.max_steps=6", "model.pretrain.log_every=2",
                     "method=spectrum", "method.ratio=0.6", "method.stages.spectrum.max_steps=8",
                     "method.stages.spectrum.finetune_steps=4",
                     "method.stages.spectrum.log_every=2",
                     "method.stages.spectrum.track_every=2", "method.calibration.num_samples=8",
                     "logger=wandb", "logger.mode=offline"], tmp_path, tmp_path / "run"))
    wb = read_back(tmp_path / "run")
    for name in ("spectrum", "numprune"):
        assert_board_matches_run(BOARDS[name], wb)


def test_peft_dashboard_names_keys_the_runs_log(tmp_path, monkeypatch):
    """The PEFT board against a SoKA run on arithmetic (base pre-trained on pycode in the
    run: its own base folder, so the base's curves are logged whatever ran before)."""
    from test_soka import OWN, PRETRAIN_PYCODE, TINY_ARITH

    from compresslab.dashboards import BOARDS

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(compose_cfg([*OWN, *PRETRAIN_PYCODE, *TINY_ARITH, "model.pretrain.log_every=10",
                     "method=soka", "method.budget_lora_rank=2", "logger=wandb",
                     "logger.mode=offline"], tmp_path, tmp_path / "run"))
    assert_board_matches_run(BOARDS["peft"], read_back(tmp_path / "run"))


def test_every_board_builds_offline():
    from compresslab.dashboards import BOARDS, workspace

    for board in BOARDS.values():
        model = workspace(board, "entity", "compresslab")._to_model()
        assert model.display_name == board.title
