"""Resuming an interrupted run: what a run leaves in its folder to make that possible.

A run folder holds, besides its results::

    run_state.json           written when the run starts: the resolved config (what must
                             match on resume) and the W&B run id (reused on resume)
    checkpoints/<NN>-<stage>[/<phase>]/last.ckpt
                             Lightning checkpoint of the stage being trained, every
                             ``checkpoint_every`` optimiser steps; removed once the stage is done
    stages/<NN>-<stage>/     one folder per finished stage: ``done.json`` (the marker,
                             written last: metrics so far, plan, frozen parameters) and,
                             for the newest one only, ``model.safetensors`` + ``plan.json``

``python run.py resume=<run folder>`` rebuilds the model of the newest finished stage
(its plan applied to the base model, then its tensors), skips the finished stages, and
lets the interrupted stage continue from its ``last.ckpt``. Stage randomness is seeded
per stage (:func:`~compresslab.seeding.derive_seed`) and the training data order and
per-step seed are functions of (seed, step), so a resumed run ends with the metrics of an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compresslab import runlock
from compresslab.checkpoints import save_compressed
from compresslab.distributed import is_main_process
from compresslab.errors import ConfigError
from compresslab.filesystem import atomic_write_text
from compresslab.run_folder import STATE_FILE, STATE_FORMAT, stage_key
from compresslab.weights_io import load_state

#: config keys that may differ on resume: they change neither results nor where they go
RESUME_IGNORED = ("run_dir", "resume", "progress", "threads", "print_table",
                  "checkpoint_every", "logger.mode")
#: metrics that measure time (wall clock, CPU) or the cache, not the model: the same
#: config and seed reproduce every other key exactly (see README, "Resume and faults")
NONDETERMINISTIC = re.compile(r"(^time/|^base_pretrain/|^base/cached$|time_s$|_ms$|ms_per_step$"
                              r"|(^|/)(cpu_)?speedup$|(^|/)seconds_to_|^cost/)")


def reproducible_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without the keys :data:`NONDETERMINISTIC` names."""
    return {k: v for k, v in metrics.items() if not NONDETERMINISTIC.search(k)}


# -- the run folder -----------------------------------------------------------------------------

def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without :data:`RESUME_IGNORED` keys, as plain JSON data; paths
    inside the run folder are written relative to it (``<run_dir>/csv``), so that a run
    folder resumed through a relative path or a symlink, or moved, still compares equal."""
    data = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    data = _relative_to_run_dir(data, cfg.get("run_dir"))
    for dotted in RESUME_IGNORED:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return data


def _relative_to_run_dir(data: Any, run_dir: str | None) -> Any:
    if not run_dir:
        return data
    forms = {str(run_dir), os.path.abspath(run_dir), str(Path(run_dir).resolve())}
    forms = sorted((f.rstrip("/") for f in forms), key=len, reverse=True)

    def relative(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, str):
            for form in forms:
                if value == form or value.startswith(form + "/"):
                    return "<run_dir>" + value[len(form):]
        return value

    return relative(data)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def config_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """'' if equal, else the differing keys, e.g. ``method.ratio: 0.4 -> 0.6``."""
    a, b = _flat(saved), _flat(now)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = ", ".join(f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_resume_folder(folder: str | Path) -> Path:
    """The folder ``resume=`` names, if it is a run folder that can continue."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"resume={folder}: no such run folder")
    runlock.check_free(folder)   # a live run is not an interrupted one
    if (folder / "metrics.json").exists():
        raise ConfigError(f"resume={folder}: the run already finished (metrics.json); "
                          f"nothing to resume")
    if not (folder / STATE_FILE).is_file():
        what = ("a run folder whose run never started" if (folder / ".hydra").is_dir()
                else "not a run folder")
        raise ConfigError(f"resume={folder}: {what} (no {STATE_FILE})")
    return folder


def resume_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config to resume with, from the command line of ``python run.py resume=DIR``.

    With no other overrides than ``resume`` and :data:`RESUME_IGNORED` keys, the run's
    saved config (``.hydra/config.yaml``) is used; otherwise the config the command line
    composes, which the pipeline then compares with the saved one.
    """
    folder = check_resume_folder(cfg.resume)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if any(k not in RESUME_IGNORED and not k.startswith("hydra") for k in keys):
        return cfg
    saved_path = folder / ".hydra" / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume={folder}: no .hydra/config.yaml to take the run's config "
                          f"from; give the run's overrides with resume=")
    try:
        saved = OmegaConf.load(saved_path)
    except Exception as exc:  # noqa: BLE001  (yaml and OmegaConf raise several kinds)
        raise ConfigError(f"resume={folder}: {saved_path} is damaged "
                          f"({str(exc).splitlines()[0]})") from None
    if not isinstance(saved, DictConfig) or "model" not in saved:
        raise ConfigError(f"resume={folder}: {saved_path} is damaged (not a run's config)")
    for key in keys:
        if key in RESUME_IGNORED:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    saved.resume = str(folder)
    saved.run_dir = str(folder)
    return saved


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object the framework wrote; a truncated or damaged file is one ConfigError
    line naming it."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {path} is damaged ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} is damaged (not a JSON object)")
    return data


def read_state(folder: Path, what: str) -> dict[str, Any]:
    state = read_json(folder / STATE_FILE, what)
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"{what}: {STATE_FILE} is damaged (no config)")
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{what}: {STATE_FILE} has format {state.get('format')!r}, "
                          f"expected {STATE_FORMAT!r}")
    return state


def saved_config(state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The config a run saved, its run-folder paths relative (also in a state written
    before they were stored so, as long as the folder has not moved)."""
    return _relative_to_run_dir(state["config"], str(run_dir))


def prepare_run_folder(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Check that this run may write into ``run_dir``; return its state (not yet written;
    ``attempts > 1``: the run continues an interrupted one).

    A folder with results is refused. ``resume`` set: the folder must hold an interrupted
    run with an equal config (:data:`RESUME_IGNORED` aside). Not set: a folder holding an
    interrupted run with an equal config is continued (so a sweep that is run again
    resumes its interrupted runs), one with another config is refused.
    """
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"run folder {run_dir} already holds results; refusing to overwrite")
    now = comparable_config(cfg)
    if cfg.get("resume"):
        folder = check_resume_folder(cfg.resume)
        if folder.resolve() != run_dir.resolve():
            raise ConfigError(f"resume={folder} but the run folder is {run_dir}")
        state = read_state(run_dir, f"resume={folder}")
        diff = config_difference(saved_config(state, run_dir), now)
        if diff:
            raise ConfigError(f"resume={folder}: the config differs from the run's ({diff}); "
                              f"resume with the run's own settings: python run.py "
                              f"resume={folder}")
    elif (run_dir / STATE_FILE).is_file():
        state = read_state(run_dir, f"run folder {run_dir}")
        diff = config_difference(saved_config(state, run_dir), now)
        if diff and is_main_process():
            raise ConfigError(f"run folder {run_dir} holds an interrupted run with another "
                              f"config ({diff}); choose another folder")
    else:
        return {"format": STATE_FORMAT, "config": now, "wandb_id": None, "attempts": 1}
    state["attempts"] = int(state.get("attempts", 1)) + 1
    return state


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    if is_main_process():
        atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))


def new_wandb_id() -> str:
    """A W&B run id (lowercase letters and digits), chosen here so it can be kept."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


# -- finished stages ----------------------------------------------------------------------------

def checkpoint_dir(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "checkpoints" / key


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}


def save_stage(ctx, index: int, stage, model: nn.Module) -> None:
    """Persist the model and what the run knows after finished stage ``index``; the
    marker ``done.json`` is written last, then older model copies and the stage's
    Lightning checkpoints are removed."""
    if not is_main_process():
        return
    root = Path(ctx.run_dir) / "stages"
    folder = root / stage_key(index, stage.name)
    if folder.exists():
        shutil.rmtree(folder)
    saves = getattr(stage, "changes_model", True)
    if saves:
        save_compressed(model, folder, {
            "model": OmegaConf.to_container(ctx.cfg.model, resolve=True),
            "data_spec": ctx.data.spec().__dict__, "layers": ctx.plan,
            "stage": stage.name, "index": index})
    folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage.name, "index": index, "model_saved": saves,
              "metrics": _json_metrics(ctx.metrics), "plan": ctx.plan,
              "frozen": [n for n, p in model.named_parameters() if not p.requires_grad]}
    atomic_write_text(folder / "done.json", json.dumps(record, indent=1, default=str))
    if saves:
        for other in root.iterdir():
            if other != folder and (other / "model.safetensors").exists():
                (other / "model.safetensors").unlink()
    shutil.rmtree(checkpoint_dir(ctx.run_dir, stage_key(index, stage.name)), ignore_errors=True)


def finished_stages(run_dir: Path, stages: list) -> list[dict[str, Any]]:
    """The ``done.json`` records of the leading finished stages (in order)."""
    records = []
    for index, stage in enumerate(stages):
        marker = Path(run_dir) / "stages" / stage_key(index, stage.name) / "done.json"
        if not marker.is_file():
            break
        record = read_json(marker, "cannot resume")
        if not all(key in record for key in ("stage", "plan", "metrics")):
            raise ConfigError(f"cannot resume: {marker} is damaged (incomplete record)")
        record["folder"] = str(marker.parent)
        records.append(record)
    return records


def restore_stages(model: nn.Module, ctx, stages: list, records: list[dict[str, Any]]
                   ) -> nn.Module:
    """The model after the last finished stage: its plan applied to the base model, each
    finished stage's :meth:`~compresslab.stages.base.Stage.rebuild`, then the tensors."""
    from compresslab.layers import apply_plan

    last = records[-1]
    saved = [r for r in records if r.get("model_saved", True)]
    weights = Path(saved[-1]["folder"]) / "model.safetensors" if saved else None
    if weights is not None and not weights.is_file():
        raise ConfigError(f"cannot resume: {weights} is missing")
    ctx.plan = dict(last["plan"])
    model = apply_plan(model, ctx.plan)
    for stage in stages[:len(records)]:
        model = stage.rebuild(model, ctx)
    if weights is not None:
        load_state(model, weights)
    frozen = set(last.get("frozen", []))
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    ctx.metrics.update(last["metrics"])
    return model.eval()


def cleanup(run_dir: Path) -> None:
    """After a finished run: drop the model copies and checkpoints kept for resuming."""
    if not is_main_process():
        return
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
    for weights in (Path(run_dir) / "stages").glob("*/model.safetensors"):
        weights.unlink()


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint (``torch.load(weights_only=True)``)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001  (only used in a message)
        return None


# -- the command line, checked before Hydra writes anything ----------------------------------

def prepare_command_line(argv: list[str]) -> list[str]:
    """``run.py``'s arguments for Hydra: ``resume=DIR`` makes Hydra work in DIR itself and
    keep its saved ``.hydra/`` config; a ``hydra.run.dir`` holding a finished or
    interrupted run is refused before Hydra overwrites that run's ``.hydra/`` record."""
    from compresslab.options import check_command_line

    check_command_line(argv)
    return _protect_run_folder(_resume_in_place(argv))


def _multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def _resume_in_place(argv: list[str]) -> list[str]:
    folder = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if not folder or folder in ("null", "None"):
        return argv
    if _multirun(argv):
        raise ConfigError("resume= continues one run; it cannot be combined with -m")
    check_resume_folder(folder)
    quoted = "'" + folder.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [*argv, f"hydra.run.dir={quoted}", "hydra.output_subdir=null"]


def _protect_run_folder(argv: list[str]) -> list[str]:
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if (not dirs or any(a.startswith("resume=") for a in argv) or _multirun(argv)
            or max(int(os.environ.get(k, "0") or 0) for k in ("LOCAL_RANK", "RANK")) > 0):
        return argv  # (the other processes of a DDP run re-run this in the same folder)
    folder = Path(dirs[-1].strip("'\""))
    if (folder / "metrics.json").exists():
        raise ConfigError(f"run folder {folder} already holds results; refusing to overwrite")
    runlock.check_free(folder)
    if (folder / STATE_FILE).exists():
        raise ConfigError(f"run folder {folder} holds an interrupted run; continue it with "
                          f"resume={folder} or choose another folder")
    return argv
