"""The pre-trained base model every method starts from, trained once and cached.

Models built from scratch (``llama_tiny``, ``vit_tiny``) are pre-trained on the
run's dataset with ``model.pretrain`` and cached under ``paths.base`` in a
folder keyed by a hash of the model config and the dataset's identity; later
runs load the cache. A file lock keeps parallel sweep jobs from training the
same base twice; of the processes of one DDP run only the main one writes the cache.
Models read from local weights are used as they are unless
``model.pretrain.max_steps > 0`` (e.g. to train a new classification head).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compresslab.data.base import TaskDataModule
from compresslab.distributed import is_main_process, wait_for
from compresslab.errors import ConfigError
from compresslab.filesystem import atomic_write_text
from compresslab.integrity import adopt_checksum, checksum_problem, discard_damaged, write_checksum
from compresslab.models.architecture import ModelSource
from compresslab.weights_io import load_state, save_state

BASE_FORMAT = "compresslab-base/1"

log = logging.getLogger(__name__)


def data_identity(data_cfg: DictConfig, data: TaskDataModule) -> dict[str, Any]:
    """What the data is (not how it is served), plus what the loader fed the training."""
    raw = OmegaConf.to_container(data_cfg, resolve=True)
    settings = {k: v for k, v in raw.get("datamodule", {}).items()
                if k not in data.loader_args or k == "batch_size"}
    # the tokenizer follows from the corpus and settings (own BPE) or from the model's path
    ident = {k: v for k, v in (getattr(data, "info", None) or {}).items() if k != "tokenizer"}
    return {"name": data_cfg.name, "settings": settings, "content": ident}


def model_identity(cfg: DictConfig) -> dict[str, Any]:
    """The model config without its name: ``model=llama`` and its alias ``model=llama_tiny``
    are one model and share one cached base."""
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
            if k != "name"}


def base_key(cfg: DictConfig, data_cfg: DictConfig, data: TaskDataModule) -> str:
    payload = {"model": model_identity(cfg),
               "data": data_identity(data_cfg, data), "format": BASE_FORMAT}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_base(model: nn.Module, folder: Path, may_rebuild: bool) -> dict[str, Any] | None:
    """Load the cached base model in ``folder`` into ``model``; its record, or None if the
    entry is damaged (removed when ``may_rebuild``, for the caller to train it again)."""
    weights = folder / "model.safetensors"
    problem = checksum_problem(weights)
    try:
        record = json.loads((folder / "base.json").read_text())
        if not isinstance(record, dict) or record.get("format") != BASE_FORMAT:
            raise ValueError("not a base-model record")
    except (ValueError, UnicodeDecodeError) as exc:
        problem = f"{folder / 'base.json'} unreadable: {exc}"
    if problem not in (None, "no checksum recorded"):
        if not may_rebuild and not is_main_process():
            discard_damaged(weights, problem, may_rebuild=False)
        if may_rebuild:
            log.warning("cached base model %s is damaged (%s); training it again", folder,
                        problem)
            _remove_base(folder)
        return None
    load_state(model, weights)
    if problem is not None:  # written before checksums: the weights loaded, record one
        adopt_checksum(weights)
    return {**record, "cached": True, "folder": str(folder)}


def _remove_base(folder: Path) -> None:
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        raise ConfigError(f"cached base model {folder} is damaged and the cache cannot be "
                          f"written ({exc.strerror}); delete it to train it again") from None


def needs_pretraining(cfg: DictConfig) -> bool:
    pre = cfg.model.get("pretrain")
    return bool(pre) and int(pre.get("max_steps", 0)) > 0


def build_base_model(cfg: DictConfig, source: ModelSource, data: TaskDataModule,
                     pretrain_fn, data_cfg: DictConfig | None = None
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """Return the base model and its record (``base.json``: metrics, time, folder).

    ``data`` is the dataset the base model is pre-trained on (``data_cfg`` its
    config; default: the run's dataset). ``pretrain_fn(model) -> dict`` trains a
    freshly built model and returns its metrics; it is only called on a cache miss.
    """
    data_cfg = data_cfg if data_cfg is not None else cfg.dataset
    if not needs_pretraining(cfg):
        L.seed_everything(int(cfg.seed), verbose=False)
        return source.build(data.spec()), {"cached": False, "pretrained_here": False}

    from filelock import FileLock

    key = base_key(cfg, data_cfg, data)
    family = cfg.model.get("family") or cfg.model.name
    folder = Path(cfg.paths.base) / f"{family}-{data_cfg.name}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    record_path = folder / "base.json"
    # several processes of one run (DDP): the main one holds the lock and writes the cache;
    # the others load the cache, or pre-train with it when it says so in ``training``
    main = is_main_process()
    training = folder.with_name(folder.name + ".training")
    if not main:
        wait_for(lambda: record_path.is_file() or (
            training.is_file() and training.read_text() == str(cfg.run_dir)),
            f"{record_path} (or {training})")
    L.seed_everything(int(cfg.model.pretrain.get("seed", 0)), verbose=False)
    model = source.build(data.spec())
    # a complete entry is read without the lock (a read-only shared cache cannot create it)
    record = cached_base(model, folder, may_rebuild=False) if record_path.is_file() else None
    if record is not None:
        return model.eval(), record
    with FileLock(str(folder) + ".lock") if main else contextlib.nullcontext():
        record = cached_base(model, folder, main) if record_path.is_file() else None
        if record is not None:
            return model.eval(), record
        start = time.perf_counter()
        if main:
            atomic_write_text(training, str(cfg.run_dir))
        try:
            metrics = pretrain_fn(model)
        finally:
            if main:
                training.unlink(missing_ok=True)
        record = {"format": BASE_FORMAT, "model": OmegaConf.to_container(cfg.model, resolve=True),
                  "data": data_identity(data_cfg, data), "metrics": metrics,
                  "pretrain_time_s": time.perf_counter() - start}
        if main:
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir()
                save_state(model, tmp / "model.safetensors")
                write_checksum(tmp / "model.safetensors")
                atomic_write_text(tmp / "base.json", json.dumps(record, indent=1, default=str))
            except BaseException:  # (a full disk): no half-written entry left behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt
            os.replace(tmp, folder)
    return model.eval(), {**record, "cached": False, "pretrained_here": True,
                          "folder": str(folder)}
