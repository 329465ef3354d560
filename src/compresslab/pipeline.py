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
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compresslab.checkpoints import atomic_write_text, save_compressed
from compresslab.compress.ratio import check_ratio
from compresslab.data.base import TaskDataModule
from compresslab.errors import ConfigError
from compresslab.models.adapters import adapter_for
from compresslab.models.base import build_base_model, needs_pretraining
from compresslab.models.sources import ModelSource
from compresslab.models.utils import count_params
from compresslab.stages.base import RunContext, Stage
from compresslab.stages.modules import EvalModule


def build_stages(cfg: DictConfig) -> list[Stage]:
    stages = []
    for name, stage_cfg in (cfg.method.get("stages") or {}).items():
        if stage_cfg is None:  # a stage switched off with method.stages.<name>=null
            continue
        stage = instantiate(stage_cfg, _convert_="partial")
        if not isinstance(stage, Stage):
            raise ConfigError(f"method.stages.{name} is not a Stage ({type(stage).__name__})")
        stage.name = name
        stages.append(stage)
    return stages


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
    if needs_pretraining(cfg):
        pretrain_stage(cfg)  # validates the base model's training settings


def pretrain_stage(cfg: DictConfig):
    from compresslab.stages.train import TrainStage

    settings = OmegaConf.to_container(cfg.model.pretrain, resolve=True)
    settings.pop("seed", None)
    stage = TrainStage(**settings)
    stage.name = "pretrain"
    return stage


def skeleton(source: ModelSource, data: TaskDataModule) -> nn.Module:
    """The model's structure without real weights (meta device), for stage checks."""
    with torch.device("meta"):
        return source.skeleton(data.spec())


def evaluate(model: nn.Module, ctx: RunContext, split: str) -> dict[str, float]:
    module = EvalModule(model, ctx.adapter, ctx.data.task)
    trainer = ctx.trainer(logger=False)
    model.eval()
    trainer.test(module, dataloaders=ctx.data.eval_dataloader(split), verbose=False)
    return module.result


def evaluate_splits(model: nn.Module, ctx: RunContext, key: str) -> dict[str, float]:
    """Metrics on every ``eval.splits`` split, named by ``key`` (``{split}``, ``{metric}``)."""
    return {key.format(split=split, metric=k): v for split in ctx.cfg.eval.splits
            for k, v in evaluate(model, ctx, split).items()}


def build_logger(cfg: DictConfig):
    if cfg.logger is None or not cfg.logger.get("_target_"):
        return None
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
    pretrain_stage(ctx.cfg).run(model, ctx)
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
    """Run one experiment; returns the metrics also written to ``metrics.json``."""
    quiet_libraries()
    run_dir = Path(cfg.run_dir)
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"run folder {run_dir} already holds results; refusing to overwrite")
    torch.set_num_threads(int(cfg.get("threads") or torch.get_num_threads()))

    source: ModelSource = instantiate(cfg.model.source)
    data: TaskDataModule = instantiate(cfg.dataset.datamodule)
    pre_data = instantiate(cfg.pretrain_data.datamodule) if cfg.get("pretrain_data") else None
    stages = build_stages(cfg)
    check_settings(cfg, source, data, pre_data)
    bare = skeleton(source, pre_data or data)
    adapter = adapter_for(bare)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, adapter=adapter, data=data)
    for stage in stages:
        stage.check(bare, ctx)
    del bare

    run_dir.mkdir(parents=True, exist_ok=True)
    ctx.logger = build_logger(cfg)
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


def _run_stages(cfg, ctx: RunContext, source: ModelSource, stages: list[Stage],
                pre_data: TaskDataModule | None = None) -> dict:
    start = time.perf_counter()
    data = ctx.data
    load_data(ctx, source, pre_data)
    if pre_data is None:
        model, base = build_base_model(cfg, source, data, lambda m: pretrain(m, ctx))
    else:
        pre_ctx = dataclasses.replace(ctx, data=pre_data)
        model, base = build_base_model(cfg, source, pre_data, lambda m: pretrain(m, pre_ctx),
                                       data_cfg=cfg.pretrain_data)
    ctx.log({"base/cached": int(base.get("cached", False)),
             **{f"base/{k}": v for k, v in base.get("metrics", {}).items()}})
    L.seed_everything(int(cfg.seed), verbose=False)

    dense_params = count_params(model)
    dense_metrics = evaluate_splits(model, ctx, "dense/{split}_{metric}") if cfg.eval.dense else {}
    ctx.log({**dense_metrics, "params/dense": dense_params})
    if any(getattr(s, "needs_dense_copy", False) for s in stages):
        ctx.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    for stage in stages:
        stage_start = time.perf_counter()
        model = stage.run(model, ctx)
        ctx.metrics.setdefault(f"{stage.name}/time_s", time.perf_counter() - stage_start)

    final = evaluate_splits(model, ctx, "{split}/{metric}")
    params = count_params(model)
    ctx.log({**final, "params/compressed": params,
             "params/ratio": 1 - params / dense_params,
             "time/total_s": time.perf_counter() - start})
    write_results(cfg, ctx, model, data)
    if cfg.get("print_table", True):
        from compresslab.report import print_run_table

        print_run_table(ctx.metrics, data.task)
    return ctx.metrics


def write_results(cfg, ctx: RunContext, model: nn.Module, data: TaskDataModule) -> None:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "seed": int(cfg.seed), "data": getattr(data, "info", {})}
    atomic_write_text(ctx.run_dir / "run_info.json", json.dumps(info, indent=1, default=str))
    if cfg.get("save_model", True) and ctx.plan:
        save_compressed(model, ctx.run_dir / "compressed", {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data_spec": data.spec().__dict__, "layers": ctx.plan})
    metrics = {k: v for k, v in ctx.metrics.items() if isinstance(v, int | float | str)}
    atomic_write_text(ctx.run_dir / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
