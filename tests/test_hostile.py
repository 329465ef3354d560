"""Hostile conditions: signals, two processes on one run folder, moved run folders, damaged
files read back, odd top-level values and file systems that refuse to write.

Signals are real: ``os.kill`` to this process (inside a stage, inside a Lightning fit) or
to a real ``run.py`` subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compresslab import interrupt, pipeline, runlock
from compresslab.errors import ConfigError
from compresslab.resume import STATE_FILE
from compresslab.stages import compress, modules
from conftest import REPO, TINY_LLAMA, compose_cfg, fitting, read_metrics, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SVD = [*TINY_LLAMA, "method=svd", "logger=csv"]
# a trained stage: SVD-LLM, then its factors fine-tuned (right, then left factors)
FT = [*TINY_LLAMA, "method=svd_llm_ft", "method.calibration.num_samples=16",
      "method.stages.finetune.max_steps=8", "checkpoint_every=3", "logger=csv"]


def run_until_signal(cfg) -> tuple[int, str]:
    """``pipeline.run`` inside ``run.py``'s signal guard: (exit code, stderr line)."""
    import contextlib
    import io

    err = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(err):
        with interrupt.exit_on_signal():
            pipeline.run(cfg)
    return stop.value.code, err.getvalue().strip()


def csv_rows(run_dir: Path) -> list[str]:
    return (run_dir / "csv" / "metrics.csv").read_text().splitlines()


# -- 1. signals ----------------------------------------------------------------------------

def test_sigterm_inside_a_stage_exits_143_closes_the_logger_and_says_how_to_resume(
        shared_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    closed = []
    real_finish = pipeline.finish_logger
    monkeypatch.setattr(pipeline, "finish_logger",
                        lambda logger, failed: (closed.append(failed),
                                                real_finish(logger, failed)))
    monkeypatch.setattr(compress.LowRankStage, "run",
                        lambda self, model, ctx: os.kill(os.getpid(), signal.SIGTERM))
    code, line = run_until_signal(compose_cfg(SVD, shared_root, run_dir))
    assert code == 128 + signal.SIGTERM
    assert line == (f"error: interrupted by SIGTERM: run folder {run_dir} kept; continue "
                    f"it with: python run.py resume={run_dir}")
    assert closed == [True]            # the logger was finished, as failed
    rows = csv_rows(run_dir)    # the dense metrics logged before the signal were written
    assert "dense/test_ppl" in rows[0].split(",") and len(rows) >= 3
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / runlock.LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is not interrupt._raise_interrupted  # restored


def test_sigterm_inside_a_lightning_fit_is_not_a_success(shared_root, tmp_path, monkeypatch):
    """Lightning turns SIGTERM into ``SystemExit(None)`` (exit code 0) on its own."""
    run_dir = tmp_path / "run"
    original = modules.TrainModule.training_step

    def signalled(self, batch, batch_idx):
        if self.trainer.global_step == 4 and fitting(self.trainer, "01-finetune/right"):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(modules.TrainModule, "training_step", signalled)
    code, line = run_until_signal(compose_cfg(FT, shared_root, run_dir))
    assert code == 143 and f"resume={run_dir}" in line
    assert (run_dir / "checkpoints" / "01-finetune" / "right" / "last.ckpt").is_file()
    assert not (run_dir / "metrics.json").exists()


def test_sigint_before_the_run_starts_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_stages",
                        lambda cfg: os.kill(os.getpid(), signal.SIGINT))
    code, line = run_until_signal(compose_cfg(SVD, tmp_path, tmp_path / "run"))
    assert code == 128 + signal.SIGINT
    assert line == (f"error: interrupted by SIGINT before the run started (run folder "
                    f"{tmp_path / 'run'}); nothing to resume")
    assert not (tmp_path / "run").exists()   # the folder made to hold the lock is gone


def test_lightnings_own_sigterm_exit_counts_as_a_signal():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    assert interrupt.signal_of(SIGTERMException()) == signal.SIGTERM
    assert interrupt.signal_of(SystemExit(3)) is None


def test_an_exit_before_lightning_is_imported_does_not_import_it():
    # a bad setting exits before the pipeline loads; importing Lightning then to classify the
    # exit cost about 5 s per one-line error
    code = ("import sys; from compresslab.interrupt import signal_of; "
            "assert signal_of(SystemExit(2)) is None; print('lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- 2. resume appends to the CSV log ------------------------------------------------------

def test_csv_logger_appends_and_drops_a_row_cut_short(tmp_path):
    from compresslab.loggers import AppendingCSVLogger

    first = AppendingCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    path = tmp_path / "csv" / "metrics.csv"
    path.write_text(path.read_text() + "2.0,")          # killed while writing a row
    second = AppendingCSVLogger(tmp_path, name="csv", version="")
    second.log_metrics({"a": 3.0}, step=1)
    second.log_metrics({"b": 4.0}, step=2)             # a new column: old rows rewritten
    second.save()
    assert path.read_text().splitlines() == ["a,b,step", "1.0,,0", "3.0,,1", ",4.0,2"]


# -- 3. a live run holds its folder --------------------------------------------------------

HOLDER = ("import sys, time; sys.path.insert(0, {src!r}); from compresslab import runlock; "
          "runlock.acquire(__import__('pathlib').Path({folder!r})); print('held', flush=True); "
          "time.sleep(60)")


@pytest.fixture
def held_folder(tmp_path):
    """A run folder whose lock a live process holds."""
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / STATE_FILE).write_text(json.dumps({"format": "compresslab-run/1",
                                                 "config": {}, "attempts": 1}))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=str(REPO / "src"),
                                                                 folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_live_run_folder_is_refused_with_one_line(held_folder, shared_root):
    folder, proc = held_folder
    with pytest.raises(ConfigError, match=rf"run folder {folder} is in use by a running run "
                                          rf"\(process {proc.pid} on .*\); wait for it"):
        pipeline.run(compose_cfg(SVD, shared_root, folder))
    for args in ([f"resume={folder}"], [f"hydra.run.dir={folder}"]):
        result = run_cli([*args, "logger=none"], timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {runlock.in_use_error(folder)}"]
    assert (folder / runlock.LOCK_FILE).is_file()   # the holder's lock is left alone


def test_a_lock_left_by_a_killed_process_is_taken_over(held_folder):
    folder, proc = held_folder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / runlock.LOCK_FILE).is_file()      # stale: its process is gone
    runlock.check_free(folder)
    assert runlock.acquire(folder)
    assert json.loads((folder / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
    runlock.release(folder)
    assert not (folder / runlock.LOCK_FILE).exists()


# -- 5. resume= through another path to the same (or a moved) folder --------------------

def test_location_dependent_paths_are_no_config_difference(tmp_path, monkeypatch):
    from compresslab import resume

    first = tmp_path / "runs" / "a"
    first.mkdir(parents=True)
    state = resume.prepare_run_folder(compose_cfg(SVD, tmp_path, first), first)
    resume.write_state(first, state)
    assert state["config"]["logger"]["save_dir"] == "<run_dir>"
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    os.symlink(moved, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for path in ("moved", "link", str(tmp_path / "link")):
        cfg = compose_cfg([*SVD, f"resume={path}"], tmp_path, Path(path))
        assert resume.prepare_run_folder(cfg, Path(path))["attempts"] == 2
    other = compose_cfg([*SVD, "seed=1", "resume=moved"], tmp_path, Path("moved"))
    with pytest.raises(ConfigError,
                       match=r"config differs from the run.s \(run_name: .*, seed: 0 -> 1\)"):
        resume.prepare_run_folder(other, Path("moved"))


# -- 1, 2, 5 together: a real process, a real signal, resumed from elsewhere ---------------

@pytest.mark.slow
def test_sigterm_to_a_real_run_then_resume_through_a_moved_folder(shared_root, tmp_path):
    """SIGTERM to ``run.py`` while it trains: exit 143, the resume line; the folder is moved
    and resumed through a relative path; the CSV rows logged before the signal survive and
    the metrics equal an uninterrupted run's."""
    args = [*FT[:-3], "method.stages.finetune.max_steps=300", "checkpoint_every=5",
            "logger=csv", "progress=false", "print_table=false", "threads=1",
            f"paths.root={shared_root}"]
    run_dir = tmp_path / "first"
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args,
                             f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = run_dir / "checkpoints" / "01-finetune" / "right" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: interrupted by SIGTERM: run folder {run_dir} kept; continue it with: "
        f"python run.py resume={run_dir}")
    before = csv_rows(run_dir)
    assert len(before) > 2

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    os.symlink(moved, tmp_path / "link")
    resumed = run_cli(["resume=link", "progress=false"], cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = csv_rows(moved)
    assert after[1:len(before)] == before[1:] or set(before[1:]) <= set(after[1:])
    whole = run_cli([*args, f"hydra.run.dir={tmp_path / 'whole'}"], timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    from compresslab.resume import reproducible_metrics

    assert reproducible_metrics(read_metrics(moved)) == \
        pytest.approx(reproducible_metrics(read_metrics(tmp_path / "whole")), rel=1e-9)


# -- 4, 6. cached artefacts are checked on load; damaged ones are built again ---------------

def overwrite_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(255 - b for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def text_data(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(SVD, tmp_path)
    return lambda: instantiate(cfg.dataset.datamodule)


@pytest.mark.parametrize("damage", ["tokenizer bytes", "tokenizer truncated", "npy bytes",
                                    "npy truncated", "npy ids beyond vocab (no checksum)"])
def test_damaged_token_caches_are_built_again(tmp_path, damage, caplog):
    import numpy as np

    make = text_data(tmp_path)
    first = make()
    first.load()
    reference = {s: np.array(first._splits[s].ids) for s in ("train", "val", "test")}
    folder = next((tmp_path / "cache").rglob("tokenizer.json")).parent
    tok, npy = folder / "tokenizer.json", next((tmp_path / "cache").rglob("val.npy"))
    if damage == "tokenizer bytes":
        overwrite_middle(tok)
    elif damage == "tokenizer truncated":
        tok.write_bytes(tok.read_bytes()[:100])
    elif damage == "npy bytes":
        overwrite_middle(npy)
    elif damage == "npy truncated":
        npy.write_bytes(npy.read_bytes()[:200])
    else:
        ids = np.load(npy)
        ids[3] = 60000   # the vocabulary has 512 ids
        np.save(npy, ids)
        Path(str(npy) + ".sha256").unlink()
    again = make()
    again.load()
    assert "is damaged" in caplog.text
    for split, ids in reference.items():
        assert np.array_equal(np.array(again._splits[split].ids), ids), split


def test_damaged_cached_base_model_is_trained_again(tmp_path, caplog):
    args = [*SVD, "method=none", "eval.splits=[val]"]
    first = pipeline.run(compose_cfg(args, tmp_path, tmp_path / "a"))
    weights = next((tmp_path / "base").rglob("model.safetensors"))
    overwrite_middle(weights, 4096)   # the header stays intact: it would load silently
    second = pipeline.run(compose_cfg(args, tmp_path, tmp_path / "b"))
    assert "cached base model" in caplog.text and "damaged" in caplog.text
    assert second["base/cached"] == 0
    assert second["val/ppl"] == pytest.approx(first["val/ppl"], rel=1e-6)
    third = pipeline.run(compose_cfg(args, tmp_path, tmp_path / "c"))
    assert third["base/cached"] == 1


@pytest.fixture(scope="module")
def interrupted_run(shared_root, tmp_path_factory):
    """A run stopped in its fine-tuning's second phase: done.json of the compression,
    last.ckpt of both phases, run_state.json; a fresh copy per use."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    mp = pytest.MonkeyPatch()
    original = modules.TrainModule.training_step

    def crashing(self, batch, batch_idx):
        if self.trainer.global_step == 7 and fitting(self.trainer, "left"):
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    mp.setattr(modules.TrainModule, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(compose_cfg(FT, shared_root, run_dir))
    mp.undo()
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\nmodel: {name: x}\n")
    return run_dir


DAMAGED_RUN_FILES = {
    "done.json": "stages/00-compress/done.json",
    "last.ckpt": "checkpoints/01-finetune/left/last.ckpt",
    "run_state.json": STATE_FILE,
    ".hydra/config.yaml": ".hydra/config.yaml",
}


@pytest.mark.parametrize("kind", list(DAMAGED_RUN_FILES))
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_run_files_are_refused_with_one_line_naming_them(
        interrupted_run, shared_root, tmp_path, kind, damage):
    from compresslab import resume

    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    path = run_dir / DAMAGED_RUN_FILES[kind]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x00\xff[:{" * 50)
    with pytest.raises(ConfigError) as error:
        cfg = compose_cfg([*FT, f"resume={run_dir}"], shared_root, run_dir)
        if kind == ".hydra/config.yaml":
            resume.resume_config(cfg, [f"resume={run_dir}"])
        else:
            pipeline.run(cfg)
    message = str(error.value)
    assert str(path) in message and "damaged" in message and "\n" not in message


# -- 7. odd top-level values, checked before any work --------------------------------------

ODD_VALUES = {
    "seed=-1": "seed must be an integer [0, 4294967295], got -1",
    "seed=4294967296": "seed must be an integer [0, 4294967295], got 4294967296",
    "seed=1.5": "seed must be an integer [0, 4294967295], got 1.5",
    "seed=abc": "seed must be an integer [0, 4294967295], got 'abc'",
    "threads=0": "threads must be an integer >= 1 or null, got 0",
    "threads=two": "threads must be an integer >= 1 or null, got 'two'",
    "checkpoint_every=-3": "checkpoint_every must be an integer >= 0 or null, got -3",
    "checkpoint_every=1.5": "checkpoint_every must be an integer >= 0 or null, got 1.5",
    "run_name=a/b": "run_name 'a/b' must be a plain folder name",
    "run_name=..": "run_name '..' must be a plain folder name",
    f"run_name={'x' * 201}": "run_name is 201 characters long; at most 200",
    "progress=maybe": "progress must be true or false, got 'maybe'",
    "eval.dense=1": "eval.dense must be true or false, got 1",
}


@pytest.mark.parametrize("override", list(ODD_VALUES), ids=lambda o: o[:24])
def test_odd_top_level_values_stop_before_any_work(override, tmp_path):
    cfg = compose_cfg([*SVD, override], tmp_path)
    with pytest.raises(ConfigError) as error:
        pipeline.run(cfg)
    assert str(error.value).startswith(ODD_VALUES[override])
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_run_name_that_escapes_paths_root_is_refused_before_hydra_writes(tmp_path):
    result = run_cli(["run_name=../../escaped", f"paths.root={tmp_path / 'out'}",
                      "logger=none"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: run_name '../../escaped' must be a plain folder name (no / or \\, not . or "
        "..): it names a folder below paths.root"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("row, message", [
    ('{"question": 5, "answer": "#### 5"}', ":1: question must be a text, got int"),
    ('["question", "answer"]', ":1 is not a JSON object"),
])
def test_qa_rows_with_fields_of_the_wrong_type_are_one_line(tmp_path, row, message):
    from compresslab.data.qa import JsonlQADataModule

    path = tmp_path / "train.jsonl"
    path.write_text(row + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}{message}")):
        JsonlQADataModule(train=str(path), test=str(path)).examples("train")


def test_text_rows_that_are_not_text_are_one_line(tmp_path):
    from compresslab.data.text_files import TextFilesDataModule

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "def f(): pass"}\n{"text": 7}\n')
    data = TextFilesDataModule(train=str(path), val=str(path), test=str(path),
                               cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"'text' of row 2 is a int, not a text"):
        data.documents("train")


# -- 9. load_compressed checks the plan against the weights header before allocating ------

def tiny_llama_folder(tmp_path) -> Path:
    from compresslab.checkpoints import save_compressed
    from compresslab.data.spec import DataSpec
    from compresslab.models.llama import TinyLlama

    source = {"_target_": "compresslab.models.sources.TinyLlama", "hidden_size": 32,
              "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    options = {k: v for k, v in source.items() if k != "_target_"}
    model = TinyLlama(**options).build(DataSpec("text", vocab_size=100))
    return save_compressed(model, tmp_path / "c", {
        "model": {"name": "llama_tiny", "source": source},
        "data_spec": {"modality": "text", "vocab_size": 100}, "layers": {}})


@pytest.mark.parametrize("change, message", [
    (("data_spec", "vocab_size", 10 ** 10),
     r"do not match the model .* of wrong shape, e\.g\. model\.embed_tokens\.weight: "
     r"\(100, 32\) in the file, \(10000000000, 32\) by the plan"),
    (("data_spec", "vocab_size", "100"), r"data_spec: vocab_size must be a positive integer, "
                                         r"got '100'"),
    (("data_spec", "vocab_size", True), r"vocab_size must be a positive integer, got True"),
])
def test_plan_is_checked_against_the_header_before_the_model_is_built(tmp_path, change,
                                                                        message):
    import resource

    from compresslab.checkpoints import load_compressed

    folder = tiny_llama_folder(tmp_path)
    plan = json.loads((folder / "plan.json").read_text())
    part, key, value = change
    plan[part][key] = value
    (folder / "plan.json").write_text(json.dumps(plan))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=message):
        load_compressed(folder)   # 10**10 x 32 floats would need 1.2 TB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_plan_layer_field_of_the_wrong_type_is_one_line(tmp_path):
    from test_checkpoints import _compressed

    from compresslab.checkpoints import load_compressed

    _, folder = _compressed(tmp_path)
    plan = json.loads((folder / "plan.json").read_text())
    plan["layers"]["layers.0"]["rank"] = "3"
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=r"layer layers.0: rank must be a positive integer, "
                                          r"got '3'"):
        load_compressed(folder)


# -- 8. file systems that refuse to write --------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """``mount(size, read_only)``: a small tmpfs at ``tmp_path/mnt`` (skips where the machine
    does not let this process mount one)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = []

    def mount(size: str, options: str = "") -> Path:
        opts = f"size={size}" + (f",{options}" if options else "")
        cmd = ["mount", "-o", f"remount,{opts}", str(mnt)] if mounted else \
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)]
        if shutil.which("mount") is None or subprocess.run(cmd, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
        mounted.append(True)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], check=False)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".tmp.npy"))]


def cli_with(args: list[str], file_limit: int | None = None) -> subprocess.CompletedProcess:
    import resource

    def limit():
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args, "progress=false",
                           "threads=1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit)


def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_file(
        small_fs, shared_root):
    pipeline.run(compose_cfg(FT, shared_root, shared_root / "warm-ft"))  # base, caches built
    run_dir = small_fs("600k") / "run"
    result = cli_with([*FT, f"paths.root={shared_root}", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write ") and "No space left on device" in line
    assert line.endswith(f"continue the run with: python run.py resume={run_dir}")
    assert leftovers(run_dir) == []


def test_file_size_limit_is_one_line_and_leaves_no_partial_file(shared_root, tmp_path):
    pipeline.run(compose_cfg(SVD, shared_root, shared_root / "warm-svd"))
    run_dir = tmp_path / "run"
    result = cli_with([*SVD, f"paths.root={shared_root}", f"hydra.run.dir={run_dir}"],
                      file_limit=100_000)   # the compressed weights are ~370 kB
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write ") and "File too large" in line
    assert leftovers(run_dir) == [] and not (run_dir / "metrics.json").exists()


def test_read_only_output_folder_is_refused_before_hydra_writes(small_fs, shared_root):
    mnt = small_fs("100k", "ro")
    result = run_cli([*SVD, f"paths.root={shared_root}", f"hydra.run.dir={mnt}/run"],
                     timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write below {mnt} (read-only or not yours); choose another "
        f"hydra.run.dir or paths.root"]


def test_read_only_shared_base_cache_that_holds_the_model_is_used(small_fs, shared_root,
                                                                   tmp_path):
    warm = pipeline.run(compose_cfg(SVD, shared_root, shared_root / "warm-ro"))
    mnt = small_fs("20m")
    shutil.copytree(shared_root / "base", mnt, dirs_exist_ok=True)
    for lock in mnt.glob("*.lock"):
        lock.unlink()
    small_fs("20m", "ro")
    cfg = compose_cfg([*SVD, f"paths.base={mnt}", f"paths.cache={shared_root}/cache"],
                      tmp_path, tmp_path / "run")
    metrics = pipeline.run(cfg)
    assert metrics["base/cached"] == 1
    assert metrics["test/ppl"] == pytest.approx(warm["test/ppl"], rel=1e-9)
