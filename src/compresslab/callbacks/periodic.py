"""Base of callbacks that sample something of the model during training."""

from __future__ import annotations

import lightning as L
import torch


class PeriodicRecorder(L.Callback):
    """Samples at the start of training, every ``every_n_steps`` optimiser steps and at
    the end (each step at most once), logging the scalars each sample returns; after
    training, :meth:`finish` runs on the main process (write files, plots)."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self.steps: list[int] = []

    def sample(self, trainer, pl_module) -> dict[str, float]:
        """Record one sample (e.g. append to ``self.values``); return scalars to log."""
        raise NotImplementedError

    def finish(self, trainer, pl_module) -> None:
        """Called once after training, on the main process only."""

    @torch.no_grad()
    def record(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if self.steps and self.steps[-1] == step:
            return
        self.steps.append(step)
        scalars = self.sample(trainer, pl_module)
        if trainer.logger is not None and scalars:
            trainer.logger.log_metrics(scalars, step=step)

    def on_train_start(self, trainer, pl_module):
        self.record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            self.record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.record(trainer, pl_module)
        if trainer.is_global_zero:
            self.finish(trainer, pl_module)
