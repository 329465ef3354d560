"""Generic trained stage: optimise the model on its dataset's task."""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn

from compresslab import sharding
from compresslab.errors import ConfigError
from compresslab.stages.base import RunContext, Stage
from compresslab.stages.modules import NonFiniteLossError, TrainModule
from compresslab.stages.optim import OptimConfig
from compresslab.tracking import stage_logger


def fit(stage: Stage, module: L.LightningModule, ctx: RunContext, *, phase: str | None = None,
        steps: int | None = None, callbacks: list | None = None,
        val_every: int | None = None, checkpoint_every: int | None = None,
        **trainer_kwargs) -> L.Trainer:
    """``trainer.fit`` that checkpoints and resumes (see :mod:`compresslab.resume`).

    ``checkpoints/<stage key>[/<phase>]/last.ckpt`` is written every ``checkpoint_every``
    optimiser steps (default: the run's ``checkpoint_every``; 0/null: never) and, for a
    ``phase`` of a stage with several fits, when the fit ends; if it exists when the fit
    starts, training continues from it (loaded with ``torch.load(weights_only=True)``).
    With ``steps`` (the fit's optimiser steps) the training data order is a function of
    (seed, step) (:class:`~compresslab.data.base.StepSampler`); every step is seeded from
    (seed, step). The seed is drawn from the global generator, which the pipeline seeds per
    stage; afterwards the global generators are re-seeded from it, so what follows does not
    depend on how this fit ran (or resumed).
    A NaN/Inf loss stops the fit with the step and the last good checkpoint.
    Under FSDP the model is gathered back whole after the fit (:func:`sharding.gather`).
    """
    from compresslab.callbacks.checkpointing import StageCheckpoint, StepSeed
    from compresslab.resume import checkpoint_dir, checkpoint_step
    from compresslab.seeding import derive_seed

    where = stage.name + (f"/{phase}" if phase else "")
    key = (stage.key or stage.name) + (f"/{phase}" if phase else "")
    folder = checkpoint_dir(ctx.run_dir, key)
    last = folder / "last.ckpt"
    resume_from = last if last.is_file() else None
    if resume_from is not None and checkpoint_step(resume_from) is None:
        raise ConfigError(f"cannot resume stage {where}: checkpoint {last} is damaged; "
                          f"delete it to train the stage again from its start")
    every = checkpoint_every if checkpoint_every is not None else ctx.cfg.get("checkpoint_every")
    seed = int(torch.randint(2**62, ()).item())
    ckpt = StageCheckpoint(folder, int(every), val_every, save_on_end=phase is not None) \
        if every else None
    cbs = [StepSeed(seed), *with_grad_norms(callbacks), *([ckpt] if ckpt else [])]
    ctx.data.train_schedule = (seed, int(steps)) if steps else None
    prefix = where.replace("/", "_")
    trainer = ctx.trainer(callbacks=cbs, enable_checkpointing=ckpt is not None,
                          logger=stage_logger(ctx.logger, prefix), label=prefix.replace("_", " "),
                          **trainer_kwargs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch")
            warnings.filterwarnings("ignore", message=".*exists and is not empty")
            trainer.fit(module, datamodule=ctx.data, ckpt_path=resume_from, weights_only=True)
    except NonFiniteLossError as exc:
        if ckpt is not None and ckpt.good_step is not None:
            good = f"{ckpt.last_model_path} (step {ckpt.good_step})"
        elif resume_from is not None:
            good = f"{resume_from} (step {checkpoint_step(resume_from)})"
        elif ctx.last_saved:
            good = f"{ctx.last_saved} (the model before stage {stage.name})"
        else:
            good = "none yet"
        raise NonFiniteLossError(f"stage {where}: {exc}; last good checkpoint: {good}") from None
    finally:
        ctx.data.train_schedule = None
    # under FSDP the module's configure_model sharded the model: whole again for what
    # follows (the next stage, evaluation, saving); the same module objects
    sharding.gather(module)
    L.seed_everything(derive_seed(seed, "after fit"), verbose=False)
    return trainer


def with_grad_norms(callbacks: list | None) -> list:
    """``callbacks`` plus a :class:`GradNormStats` (gradient norm and learning rate curves)
    unless the stage brought its own (an adapter stage reads its statistics)."""
    from compresslab.callbacks.training_stats import GradNormStats

    callbacks = list(callbacks or [])
    if not any(isinstance(cb, GradNormStats) for cb in callbacks):
        callbacks.append(GradNormStats())
    return callbacks


class TrainStage(Stage):
    """Train for ``max_steps`` with ``optim``; validate every ``val_every`` steps.

    ``callbacks``: Lightning callbacks (e.g. the singular-value trajectory), given
    as ``_target_`` objects in the config.
    """

    module_class = TrainModule

    def __init__(self, max_steps: int = 100, optim: dict | None = None,
                 val_every: int | None = None, callbacks: list | None = None,
                 log_every: int = 10):
        self.max_steps, self.val_every, self.log_every = max_steps, val_every, log_every
        self.optim = OptimConfig.from_cfg(optim)
        self.callbacks = list(callbacks or [])

    def check(self, model, ctx):
        if self.max_steps < 1:
            raise ConfigError(f"stage {self.name}: max_steps must be at least 1")

    def make_module(self, model: nn.Module, ctx: RunContext) -> TrainModule:
        return self.module_class(model, ctx.adapter, ctx.data.task, self.optim, self.max_steps)

    def trainer_kwargs(self) -> dict[str, Any]:
        return dict(max_steps=self.max_steps, max_epochs=-1, log_every_n_steps=self.log_every,
                    val_check_interval=self.val_every, check_val_every_n_epoch=None,
                    limit_val_batches=1.0 if self.val_every else 0,
                    gradient_clip_val=self.optim.grad_clip)

    def run(self, model, ctx, phase: str | None = None):
        start = time.perf_counter()
        module = self.make_module(model, ctx)
        for cb in self.callbacks:
            if hasattr(cb, "file_prefix") and not cb.file_prefix.startswith(f"{self.name}_"):
                cb.file_prefix = f"{self.name}_{cb.file_prefix}"
        model.train()
        trainer = fit(self, module, ctx, phase=phase, steps=self.max_steps,
                      callbacks=self.callbacks, val_every=self.val_every, **self.trainer_kwargs())
        model.eval()
        ctx.log({f"{self.name}/time_s": time.perf_counter() - start,
                 f"{self.name}/steps": trainer.global_step,
                 **{f"{self.name}/val_{k}": v for k, v in module.last_val.items()}})
        return model
