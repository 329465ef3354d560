"""Base of callbacks that sample something of the model during training."""

from __future__ import annotations

import lightning as L
import torch

from compresslab.sharding import unsharded


class PeriodicRecorder(L.Callback):
    """Samples at the start of training, every ``every_n_steps`` optimiser steps and at
    the end (each step at most once), logging the scalars each sample returns; after
    training, :meth:`finish` runs on the main process (write files, plots)."""

    #: attributes saved in checkpoints (a resumed run continues the same records)
    state_attrs: tuple[str, ...] = ("steps", "values")

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self.steps: list[int] = []
        self._resumed = False

    def state_dict(self) -> dict:
        return {a: getattr(self, a) for a in self.state_attrs if hasattr(self, a)}

    def load_state_dict(self, state_dict: dict) -> None:
        for attr, value in state_dict.items():
            setattr(self, attr, value)
        self._resumed = True

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
        model = getattr(pl_module, "model", None)
        if model is None:
            scalars = self.sample(trainer, pl_module)
        else:  # under FSDP: sample the whole parameters (every process gathers them)
            with unsharded(model):
                scalars = self.sample(trainer, pl_module)
        if trainer.logger is not None and scalars:
            trainer.logger.log_metrics(scalars, step=step)

    def on_train_start(self, trainer, pl_module):
        if not self._resumed:  # a resumed fit recorded its start in the first attempt
            self.record(trainer, pl_module)
        self._resumed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            self.record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.record(trainer, pl_module)
        if trainer.is_global_zero:
            self.finish(trainer, pl_module)
