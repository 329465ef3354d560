"""Build a run from its config: model -> stages in order -> evaluation -> metrics.json.

Order of work, so that bad input fails before anything expensive happens:

1. instantiate the model source, the datamodule and the stages (no work);
2. check every setting: paths, modality of model vs dataset, ratios, and each
   stage against a weightless skeleton of the model (ranks a layer cannot take);
3. start the logger, load data, build/load the base model, evaluate it dense;
4. run the stages, evaluate the result, write ``metrics.json`` (and the
   compressed model with its plan), print the dense-vs-compressed table.
The logger is always finished, also when a stage fails.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compresslab import choices, interrupt, resume, runlock, sharding, tracking
from compresslab.api import compress_model, named_stages
from compresslab.base_cache import build_base_model, needs_pretraining
from compresslab.checkpoints import save_compressed
from compresslab.compress.ratio import check_ratio
from compresslab.data.base import TaskDataModule
from compresslab.distributed import check_trainer, is_main_process, world
from compresslab.errors import ConfigError
from compresslab.filesystem import atomic_write_text
from compresslab.matrix import check_pair
from compresslab.metrics import zero_shot
from compresslab.metrics.cost import CompressionCost
from compresslab.models.architecture import ModelSource, adapter_for
from compresslab.models.utils import count_params
from compresslab.options import check_top_level
from compresslab.stages.base import RunContext, Stage
from compresslab.stages.modules import EvalModule
from compresslab.threads import run_threads

log = logging.getLogger(__name__)


def build_stages(cfg: DictConfig) -> list[Stage]:
    stages = {}
    for name, stage_cfg in (cfg.method.get("stages") or {}).items():
        if stage_cfg is None:  # a stage switched off with method.stages.<name>=null
            continue
        try:
            stage = instantiate(stage_cfg, _convert_="partial")
        except InstantiationException as exc:
            raise ConfigError(f"method.stages.{name}: {instantiation_reason(exc)}") from None
        if not isinstance(stage, Stage):
            raise ConfigError(f"method.stages.{name} is not a Stage ({type(stage).__name__})")
        stages[name] = stage
    return named_stages(stages)


def instantiation_reason(exc: Exception) -> str:
    """The user-facing part of Hydra's instantiation error (e.g. an unknown option)."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ConfigError):
        return str(cause)
    text = " ".join(str(cause).split())
    text = text.split("Error in call to target", 1)[0].strip() or text
    match = re.search(r"got an unexpected keyword argument '(\w+)'", text)
    if match:
        return f"unknown option {match.group(1)!r}"
    return text


def build_object(node, where: str):
    """``instantiate(node)``; a bad option is a one-line ConfigError naming ``where``."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        raise ConfigError(f"{where}: {instantiation_reason(exc)}") from None


def check_settings(cfg: DictConfig, source: ModelSource, data: TaskDataModule,
                   pre_data: TaskDataModule | None = None) -> None:
    for name, dm in ((cfg.dataset.name, data),
                     (cfg.pretrain_data.name if pre_data else None, pre_data)):
        if dm is not None and source.modality != dm.modality:
            raise ConfigError(f"model={cfg.model.name} ({source.modality}) cannot run on "
                              f"dataset={name} ({dm.modality})")
    if pre_data is not None:
        pre_data.check()
    ratio = cfg.method.get("ratio")
    if ratio is not None:
        check_ratio(ratio, "method.ratio")
    source.check()
    data.check()
    data.check_loader()
    check_trainer(cfg)
    zero_shot.check(cfg, source.modality)
    bad_splits = [s for s in cfg.eval.splits if s not in ("train", "val", "test")]
    if bad_splits:
        raise ConfigError(f"eval.splits: unknown split(s) {', '.join(map(str, bad_splits))} "
                          f"(train | val | test)")
    pretrain_steps = (cfg.model.get("pretrain") or {}).get("max_steps", 0)
    if int(pretrain_steps or 0) < 0:
        raise ConfigError(f"model.pretrain.max_steps must be >= 0 (0: no pre-training), "
                          f"got {pretrain_steps}")
    if needs_pretraining(cfg):
        pretrain_stage(cfg)  # validates the base model's training settings


def pretrain_stage(cfg: DictConfig):
    from compresslab.stages.train import TrainStage

    settings = OmegaConf.to_container(cfg.model.pretrain, resolve=True)
    settings.pop("seed", None)
    stage = TrainStage(**settings)
    stage.name, stage.key = "base_pretrain", "base-pretrain"
    return stage


def skeleton(source: ModelSource, data: TaskDataModule) -> nn.Module:
    """The model's structure without real weights (meta device), for stage checks."""
    with torch.device("meta"):
        return source.skeleton(data.spec())


def evaluate(model: nn.Module, ctx: RunContext, split: str) -> dict[str, float]:
    module = EvalModule(model, ctx.adapter, ctx.data.task)
    trainer = ctx.trainer(logger=False, label=f"evaluate {split}")
    model.eval()
    trainer.test(module, dataloaders=ctx.data.eval_dataloader(split), verbose=False)
    sharding.gather(model)  # under FSDP the test sharded it (EvalModule.configure_model)
    return module.result


def evaluate_splits(model: nn.Module, ctx: RunContext, key: str) -> dict[str, float]:
    """Metrics on every ``eval.splits`` split, named by ``key`` (``{split}``, ``{metric}``)."""
    return {key.format(split=split, metric=k): v for split in ctx.cfg.eval.splits
            for k, v in evaluate(model, ctx, split).items()}


def build_logger(cfg: DictConfig, state: dict | None = None):
    """The run's logger; W&B gets the run id kept in ``state`` (a new one the first time),
    with ``resume="allow"`` so that a resumed run appends to the same W&B run."""
    if cfg.logger is None or not cfg.logger.get("_target_"):
        return None
    if state is not None and cfg.logger._target_.endswith("WandbLogger"):
        state["wandb_id"] = state.get("wandb_id") or resume.new_wandb_id()
        return instantiate(cfg.logger, id=state["wandb_id"], resume="allow")
    return instantiate(cfg.logger)


def finish_logger(logger, failed: bool) -> None:
    if logger is None:
        return
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    else:
        logger.finalize("failed" if failed else "success")


def pretrain(model: nn.Module, ctx: RunContext) -> dict[str, float]:
    """Train a fresh base model on ``ctx.data`` and evaluate it on val and test."""
    stage = pretrain_stage(ctx.cfg)
    tracking.announce_pretraining(ctx.cfg, model, ctx, stage.max_steps)
    stage.run(model, ctx)
    return {f"{split}/{k}": v for split in ("val", "test")
            for k, v in evaluate(model, ctx, split).items()}


def quiet_libraries() -> None:
    """Keep Lightning's per-trainer banners out of the run log."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the metrics also written to ``metrics.json``. The run
    folder is locked against a second process while it runs (:mod:`compresslab.runlock`)."""
    quiet_libraries()
    check_pair(cfg)   # a method x model pair outside the matrix: one line, no work
    run_dir = Path(cfg.run_dir)
    interrupt.note_run_dir(run_dir)
    with runlock.hold(run_dir):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    check_top_level(cfg)
    state = resume.prepare_run_folder(cfg, run_dir)   # refuses results, another run's folder
    if state["attempts"] > 1:
        log.warning("continuing the interrupted run in %s (attempt %d)", run_dir,
                    state["attempts"])

    source: ModelSource = build_object(cfg.model.source, "model.source")
    data: TaskDataModule = build_object(cfg.dataset.datamodule, "dataset.datamodule")
    pre_data = (build_object(cfg.pretrain_data.datamodule, "pretrain_data.datamodule")
                if cfg.get("pretrain_data") else None)
    stages = build_stages(cfg)
    check_settings(cfg, source, data, pre_data)
    bare = skeleton(source, pre_data or data)
    torch.set_num_threads(run_threads(cfg.get("threads"), bare))
    source.check_weights(bare)
    adapter = adapter_for(bare)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, adapter=adapter, data=data)
    for stage in stages:
        stage.check(bare, ctx)
    # read the data before the run folder is written: an empty, damaged or too small
    # dataset also stops the run here (token caches may be written, nothing else)
    data_start = time.perf_counter()
    load_data(ctx, source, pre_data)
    check_data(ctx, bare, stages)
    ctx.metrics["time/data_s"] = time.perf_counter() - data_start
    del bare

    ctx.choices = choices.describe(cfg)
    if is_main_process():
        print(choices.header(ctx.choices, run_dir), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx.logger = build_logger(cfg, state)
    tracking.log_config(ctx.logger, cfg)
    resume.write_state(run_dir, state)
    failed = True
    try:
        ctx.metrics.update(_run_stages(cfg, ctx, source, stages, pre_data))
        failed = False
    finally:
        finish_logger(ctx.logger, failed)
    return ctx.metrics


def load_data(ctx: RunContext, source: ModelSource, pre_data: TaskDataModule | None):
    """Load the run's data (and the base model's pre-training data, whose tokenizer
    the run's data must then share)."""
    if pre_data is None:
        ctx.data.load(tokenizer=source.tokenizer())
        return
    pre_data.load(tokenizer=source.tokenizer())
    ctx.data.load(tokenizer=pre_data.shared_tokenizer())


def check_data(ctx: RunContext, bare: nn.Module, stages: list[Stage]) -> None:
    """Checks that need the loaded data: the tokenizer against the model's embedding, and
    each stage's :meth:`~compresslab.stages.base.Stage.check_data` (e.g. calibration size)."""
    spec = ctx.data.spec()
    embeddings = getattr(bare, "get_input_embeddings", None)
    table = embeddings() if callable(embeddings) else None
    if spec.modality == "text" and spec.vocab_size and table is not None \
            and spec.vocab_size > table.num_embeddings:
        raise ConfigError(f"tokenizer mismatch: dataset={ctx.cfg.dataset.name} is tokenized "
                          f"into {spec.vocab_size} token ids but model={ctx.cfg.model.name} "
                          f"has {table.num_embeddings} embedding rows; use the model's own "
                          f"tokenizer (a checkpoint folder's tokenizer files)")
    for stage in stages:
        stage.check_data(ctx)


def _run_stages(cfg, ctx: RunContext, source: ModelSource, stages: list[Stage],
                pre_data: TaskDataModule | None = None) -> dict:
    start = time.perf_counter()
    data = ctx.data
    if pre_data is None:
        model, base = build_base_model(cfg, source, data, lambda m: pretrain(m, ctx))
    else:
        pre_ctx = dataclasses.replace(ctx, data=pre_data)
        model, base = build_base_model(cfg, source, pre_data, lambda m: pretrain(m, pre_ctx),
                                       data_cfg=cfg.pretrain_data)
    shutil.rmtree(resume.checkpoint_dir(ctx.run_dir, "base-pretrain"), ignore_errors=True)
    ctx.log({"base/cached": int(base.get("cached", False)),
             **{f"base/{k}": v for k, v in base.get("metrics", {}).items()}})
    L.seed_everything(int(cfg.seed), verbose=False)

    done = resume.finished_stages(ctx.run_dir, stages)   # [] unless continuing a run
    dense_params = count_params(model)
    if not done:  # (a resumed run has these in the finished stages' records)
        dense = {**evaluate_splits(model, ctx, "dense/{split}_{metric}"),
                 **zero_shot.evaluate(model, ctx, "dense/")} if cfg.eval.dense else {}
        ctx.log({**dense, "params/dense": dense_params})
    if any(getattr(s, "needs_dense_copy", False) for s in stages[len(done):]):
        ctx.teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if done:
        model = resume.restore_stages(model, ctx, stages, done)
        dense_params = int(ctx.metrics.get("params/dense", dense_params))
        ctx.last_saved = done[-1]["folder"]
        log.info("resuming after stage %s (%s)", done[-1]["stage"], ctx.last_saved)

    cost = CompressionCost()   # wall time and peak RSS of the stages (this attempt's)

    def save(index: int, stage: Stage, model: nn.Module) -> None:
        resume.save_stage(ctx, index, stage, model)
        ctx.last_saved = str(ctx.run_dir / "stages" / stage.key)

    # the stages finished in an earlier attempt are skipped (their seeds do not depend on
    # them); the settings were checked on a skeleton before any work
    model = compress_model(model, stages, ctx=ctx, seed=int(cfg.seed), start=len(done),
                           check=False, after_stage=save).model

    ctx.log(cost.metrics())
    final = {**evaluate_splits(model, ctx, "{split}/{metric}"), **zero_shot.evaluate(model, ctx)}
    params = count_params(model)
    ctx.log({**final, "params/compressed": params,
             "params/ratio": 1 - params / dense_params,
             "time/total_s": time.perf_counter() - start})
    write_results(cfg, ctx, model, data)
    tracking.log_results(ctx.logger, cfg, ctx.metrics, data.task, ctx.run_dir)
    resume.cleanup(ctx.run_dir)
    if cfg.get("print_table", True) and is_main_process():
        from compresslab.report import print_run_table

        print_run_table(ctx.metrics, data.task)
    return ctx.metrics


def write_results(cfg, ctx: RunContext, model: nn.Module, data: TaskDataModule) -> None:
    if not is_main_process():  # several processes (DDP): only the main one writes
        return
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "seed": int(cfg.seed), "processes": world()[1], "data": getattr(data, "info", {}),
            "choices": ctx.choices}
    atomic_write_text(ctx.run_dir / "run_info.json", json.dumps(info, indent=1, default=str))
    if cfg.get("save_model", True) and ctx.plan:
        save_compressed(model, ctx.run_dir / "compressed", {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data_spec": data.spec().__dict__, "layers": ctx.plan},
            getattr(data, "shared_tokenizer", lambda: None)())
    metrics = {k: v for k, v in ctx.metrics.items() if isinstance(v, int | float | str)}
    atomic_write_text(ctx.run_dir / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
