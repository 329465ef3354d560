"""Generic trained stage: optimise the model on its dataset's task."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from compresslab.errors import ConfigError
from compresslab.stages.base import RunContext, Stage
from compresslab.stages.modules import TrainModule
from compresslab.stages.optim import OptimConfig


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

    def run(self, model, ctx):
        start = time.perf_counter()
        module = self.make_module(model, ctx)
        for cb in self.callbacks:
            if hasattr(cb, "file_prefix"):
                cb.file_prefix = f"{self.name}_{cb.file_prefix}"
        trainer = ctx.trainer(callbacks=self.callbacks, **self.trainer_kwargs())
        model.train()
        trainer.fit(module, datamodule=ctx.data)
        model.eval()
        ctx.log({f"{self.name}/time_s": time.perf_counter() - start,
                 f"{self.name}/steps": trainer.global_step,
                 **{f"{self.name}/val_{k}": v for k, v in module.last_val.items()}})
        return model
