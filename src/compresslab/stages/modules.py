"""LightningModules shared by every trained stage and by evaluation."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from compresslab import sharding
from compresslab.errors import NumericalError
from compresslab.models.architecture import ArchitectureAdapter
from compresslab.stages.optim import OptimConfig, build_optimizer
from compresslab.tasks import Task


class NonFiniteLossError(NumericalError):
    """The training loss became NaN or Inf."""


def _accumulate(store: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    for key, value in sums.items():
        value = value.detach().double()
        store[key] = store[key] + value if key in store else value


class EvalModule(L.LightningModule):
    """Runs a task's evaluation sums over a loader; ``self.result`` holds the metrics."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, task: Task):
        super().__init__()
        self.model, self.adapter, self.task = model, adapter, task
        self._sums: dict[str, torch.Tensor] = {}
        self.result: dict[str, float] = {}

    def configure_model(self):
        """Under FSDP (``trainer=fsdp``): shard the model (:mod:`compresslab.sharding`);
        the caller gathers it back after the test."""
        sharding.configure(self)

    def test_step(self, batch, batch_idx):
        _accumulate(self._sums, self.task.eval_sums(self.model, self.adapter, batch))

    def on_test_epoch_end(self):
        reduced = {k: float(self.trainer.strategy.reduce(v, reduce_op="sum"))
                   for k, v in self._sums.items()}
        self.result = {k: float(v) for k, v in self.task.metrics(reduced).items()}
        self._sums = {}


class TrainModule(L.LightningModule):
    """Trains ``model`` on ``task`` with the configured optimiser; logs ``train/loss`` (under
    the stage's prefix, :class:`compresslab.tracking.StageLogger`).

    Subclasses add loss terms by overriding :meth:`extra_losses`, which returns
    named terms that are logged as ``train/loss_<name>`` and added to the loss.

    Under FSDP the model is sharded when the fit starts (:meth:`configure_model`) and
    gathered back by :func:`compresslab.stages.train.fit`. A subclass whose losses read the
    model's parameters outside its forward pass sets ``params_outside_forward``: the
    parameters are then gathered for the whole training step (before the step, kept after
    the forward), so such code sees plain tensors.
    """

    params_outside_forward: bool = False

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, task: Task,
                 optim: OptimConfig, total_steps: int):
        super().__init__()
        self.model, self.adapter, self.task = model, adapter, task
        self.optim, self.total_steps = optim, total_steps
        self._val_sums: dict[str, torch.Tensor] = {}
        self.last_val: dict[str, float] = {}

    def configure_model(self):
        sharding.configure(self, reshard_after_forward=not self.params_outside_forward)

    def on_train_batch_start(self, batch, batch_idx):
        if self.params_outside_forward:
            sharding.unshard(self.model)  # no-op unless sharded

    def task_loss(self, batch) -> torch.Tensor:
        return self.task.loss(self.model, self.adapter, batch)

    def extra_losses(self, batch) -> dict[str, torch.Tensor]:
        return {}

    def training_step(self, batch, batch_idx):
        task_loss = self.task_loss(batch)
        extras = self.extra_losses(batch)
        loss = task_loss + sum(extras.values()) if extras else task_loss
        value = float(loss.detach())
        finite = math.isfinite(value)
        if self.trainer.world_size > 1:  # every process stops, not only the one that saw it
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            where = value if not math.isfinite(value) else "NaN/Inf in another process"
            raise NonFiniteLossError(f"training loss is {where} at step {self.global_step}")
        logs = {"train/loss": loss}
        if extras:
            logs["train/loss_task"] = task_loss
            logs.update({f"train/loss_{k}": v for k, v in extras.items()})
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=self._batch_size(batch))
        return loss

    @staticmethod
    def _batch_size(batch) -> int:
        first = batch[0] if isinstance(batch, list | tuple) else batch
        return first.shape[0] if isinstance(first, torch.Tensor) else 1

    def validation_step(self, batch, batch_idx):
        _accumulate(self._val_sums, self.task.eval_sums(self.model, self.adapter, batch))

    def on_validation_epoch_end(self):
        reduced = {k: float(self.trainer.strategy.reduce(v, reduce_op="sum"))
                   for k, v in self._val_sums.items()}
        self._val_sums = {}
        if reduced:
            self.last_val = {k: float(v) for k, v in self.task.metrics(reduced).items()}
            self.log_dict({f"val/{k}": v for k, v in self.last_val.items()}, sync_dist=False)

    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.optim, self.total_steps)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["compresslab"] = {"last_val": dict(self.last_val)}

    def on_load_checkpoint(self, checkpoint):
        self.last_val = dict(checkpoint.get("compresslab", {}).get("last_val", {}))
