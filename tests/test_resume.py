"""Resume: checkpoints of trained stages, finished stages skipped, the same W&B run, and the
same final metrics as an uninterrupted run (README, "Resume and faults")."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from compresslab.errors import ConfigError
from compresslab.pipeline import run
from compresslab.resume import STATE_FILE, reproducible_metrics
from compresslab.stages import compress, modules
from conftest import REPO, TINY_LLAMA, compose_cfg, fitting, read_metrics, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# SVD-LLM whitening, then its factor fine-tuning in two phases (right, then left factors)
FT = [*TINY_LLAMA, "method=svd_llm_ft", "method.calibration.num_samples=16",
      "method.stages.finetune.max_steps=8", "checkpoint_every=3"]


def crash_training_at(monkeypatch, phase: str, step: int):
    """Make the training step raise (a stand-in for a killed process) at ``step`` of the
    fit whose checkpoint folder ends with ``phase``; returns the original step."""
    original = modules.TrainModule.training_step

    def crashing(self, batch, batch_idx):
        if self.trainer.global_step == step and fitting(self.trainer, phase):
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(modules.TrainModule, "training_step", crashing)
    return original


def test_interrupted_run_resumes_skipping_finished_stages(shared_root, tmp_path, monkeypatch):
    whole = run(compose_cfg(FT, shared_root, tmp_path / "whole"))

    run_dir = tmp_path / "run"
    original = crash_training_at(monkeypatch, "finetune/left", 7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg(FT, shared_root, run_dir))
    monkeypatch.setattr(modules.TrainModule, "training_step", original)
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "stages" / "00-compress" / "done.json").is_file()
    assert (run_dir / "stages" / "00-compress" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "01-finetune" / "right" / "last.ckpt").is_file()
    left = run_dir / "checkpoints" / "01-finetune" / "left" / "last.ckpt"
    # the checkpoint holds nothing that needs unpickling: it loads with weights_only=True
    state = torch.load(left, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and "last_val" in state["compresslab"]

    # a run with another config must not take over the interrupted run's folder
    with pytest.raises(ConfigError, match=r"holds an interrupted run with another config "
                                          r"\(method.stages.finetune.max_steps: 8 -> 9\)"):
        run(compose_cfg([*FT, "method.stages.finetune.max_steps=9"], shared_root, run_dir))

    def compress_again(self, model, ctx):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(compress.LowRankStage, "run", compress_again)
    resumed = run(compose_cfg([*FT, f"resume={run_dir}"], shared_root, run_dir))
    assert reproducible_metrics(resumed) == reproducible_metrics(whole)
    assert reproducible_metrics(read_metrics(run_dir)) == \
        reproducible_metrics(read_metrics(tmp_path / "whole"))
    # what was kept for resuming is gone once the run finished; the markers stay
    assert not (run_dir / "checkpoints").exists()
    assert not list((run_dir / "stages").glob("*/model.safetensors"))
    assert json.loads((run_dir / STATE_FILE).read_text())["attempts"] == 2


def test_adapter_run_resumes_with_the_peft_adapters_rebuilt(shared_root, tmp_path,
                                                            monkeypatch):
    """LoRA's adapters are not in the plan: the finished ``adapt`` stage re-wraps the model
    (``Stage.rebuild``) before its saved tensors are loaded. The same command run again
    (as a sweep does) continues the interrupted run in its folder."""
    args = [*TINY_LLAMA, "method=lora", "method.stages.finetune.max_steps=6",
            "checkpoint_every=3"]
    whole = run(compose_cfg(args, shared_root, tmp_path / "whole"))
    original = crash_training_at(monkeypatch, "01-finetune", 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg(args, shared_root, tmp_path / "run"))
    monkeypatch.setattr(modules.TrainModule, "training_step", original)
    resumed = run(compose_cfg(args, shared_root, tmp_path / "run"))
    assert reproducible_metrics(resumed) == reproducible_metrics(whole)
    assert json.loads((tmp_path / "run" / STATE_FILE).read_text())["attempts"] == 2


def test_deep_linear_network_resumes_exactly(tmp_path, monkeypatch):
    """The DLN stage's own gradient-descent loop: iteration count, recorder and trajectory
    continue from the checkpoint."""
    from compresslab.stages import dln

    args = ["experiment=dln_factorization", "dataset.datamodule.d=12",
            "dataset.datamodule.r=2", "method.stages.train.max_steps=300",
            "model.source.init_scale=0.1", "method.stages.train.optim.lr=8",
            "method.stages.train.checkpoint_every=100"]
    whole = run(compose_cfg(args, tmp_path, tmp_path / "whole"))
    original = dln.DeepLinearGD.training_step

    def crashing(self, batch, batch_idx):
        if self.iteration >= 250:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(dln.DeepLinearGD, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg(args, tmp_path, tmp_path / "run"))
    monkeypatch.setattr(dln.DeepLinearGD, "training_step", original)
    assert (tmp_path / "run" / "checkpoints" / "00-train" / "last.ckpt").is_file()
    resumed = run(compose_cfg([*args, f"resume={tmp_path / 'run'}"], tmp_path,
                              tmp_path / "run"))
    assert reproducible_metrics(resumed) == reproducible_metrics(whole)
    trajectories = []
    for name in ("whole", "run"):
        data = json.loads((tmp_path / name / "train_trajectory.json").read_text())
        data.pop("time_s")
        trajectories.append(data)
    assert trajectories[0] == trajectories[1]


def test_resume_refuses_other_config_and_finished_or_foreign_folders(shared_root, tmp_path,
                                                                     monkeypatch):
    run_dir = tmp_path / "run"
    crash_training_at(monkeypatch, "finetune/right", 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg(FT, shared_root, run_dir))
    changed = [*FT[:-2], "method.stages.finetune.max_steps=9", f"resume={run_dir}"]
    with pytest.raises(ConfigError, match=r"config differs from the run's \(method.stages."
                                          r"finetune.max_steps: 8 -> 9\)"):
        run(compose_cfg(changed, shared_root, run_dir))
    with pytest.raises(ConfigError, match="not a run folder"):
        run(compose_cfg([*FT, f"resume={tmp_path}"], shared_root, tmp_path))
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="already"):
        run(compose_cfg([*FT, f"resume={run_dir}"], shared_root, run_dir))
    assert (run_dir / "metrics.json").read_text() == "{}"


def test_cli_resume_of_a_non_run_folder_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes").mkdir()
    result = run_cli([f"resume={tmp_path / 'notes'}"])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: resume={tmp_path / 'notes'}: not a run folder "
                                     f"(no {STATE_FILE})")
    assert list((tmp_path / "notes").iterdir()) == []   # Hydra wrote nothing there


def test_wandb_run_id_is_kept_and_reused(shared_root, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = [*FT, "logger=wandb", "method.stages.finetune.max_steps=3"]
    run_dir = tmp_path / "run"
    ids = []
    original_finish = wandb.finish

    def spy_finish(*a, **k):
        ids.append(wandb.run.id)
        return original_finish(*a, **k)

    monkeypatch.setattr(wandb, "finish", spy_finish)
    original = crash_training_at(monkeypatch, "finetune/left", 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg(args, shared_root, run_dir))
    monkeypatch.setattr(modules.TrainModule, "training_step", original)
    saved = json.loads((run_dir / STATE_FILE).read_text())["wandb_id"]
    assert saved and ids == [saved] and wandb.run is None
    run(compose_cfg([*args, f"resume={run_dir}"], shared_root, run_dir))
    assert ids == [saved, saved]
    # both attempts wrote to the one id: W&B names offline folders by the second and the
    # id, adding "-1", "-2" when two attempts start in the same second
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    named = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{saved}(-\d+)?")
    assert folders and all(named.fullmatch(f.name) for f in folders), folders


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_ends_like_an_uninterrupted_run(shared_root, tmp_path):
    """A real process killed with SIGKILL while a trained stage runs; ``resume=`` on the
    command line finishes it with the metrics of an uninterrupted run of the same seed."""
    args = ["method=pela", "method.stages.pretrain.max_steps=150",
            "method.stages.finetune.max_steps=40", "checkpoint_every=20", "threads=1",
            "logger=csv", "progress=false", "print_table=false", f"paths.root={shared_root}",
            *TINY_LLAMA]
    whole = tmp_path / "whole"
    done = run_cli([*args, f"hydra.run.dir={whole}"], timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args,
                             f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "02-pretrain" / "last.ckpt"
    deadline = time.monotonic() + 900
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)   # a few steps past the checkpoint: those are trained again on resume
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "stages" / "00-decompose" / "done.json").is_file()
    assert not (run_dir / "stages" / "02-pretrain" / "done.json").exists()

    resumed = run_cli([f"resume={run_dir}", "progress=false"], timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = reproducible_metrics(read_metrics(whole)), reproducible_metrics(read_metrics(run_dir))
    assert set(a) == set(b) and "test/ppl" in a and "pretrain/steps" in a
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300) for k in a
                if isinstance(a[k], int | float))
    print(f"{len(a)} metrics compared; largest relative difference {worst:.3g}")
    assert b == pytest.approx(a, rel=1e-9, abs=0)
    # the logger's file continued: the rows written before the kill are still there
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) > 1
    assert json.loads((run_dir / STATE_FILE).read_text())["attempts"] == 2
