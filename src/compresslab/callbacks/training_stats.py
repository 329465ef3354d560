"""Training statistics for adapter comparisons: gradient-norm mean/variance and the
number of steps needed to reach a target training loss."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class GradNormStats(L.Callback):
    """Global L2 norm of the trainable gradients before each optimiser step (before
    clipping) and the learning rate; logs ``train/grad_norm`` and ``train/lr`` every
    ``log_every`` steps (default: the trainer's ``log_every_n_steps``) and keeps every norm
    for mean and variance. Every trained stage gets one (:func:`stages.train.fit`)."""

    def __init__(self, log_every: int | None = None):
        self.log_every = log_every
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach() for p in pl_module.parameters()
                 if p.requires_grad and p.grad is not None]
        if not grads:
            return
        # under FSDP a gradient is a DTensor: each process holds one shard, so the squares
        # of the shards are added up over the processes (plain gradients are whole)
        whole = sum(float(g.double().pow(2).sum()) for g in grads if not isinstance(g, DTensor))
        shards = torch.tensor(sum(float(g.to_local().double().pow(2).sum())
                                  for g in grads if isinstance(g, DTensor)), dtype=torch.float64)
        if any(isinstance(g, DTensor) for g in grads) and trainer.world_size > 1:
            shards = trainer.strategy.reduce(shards, reduce_op="sum")
        norm = math.sqrt(whole + float(shards))
        self.norms.append(norm)
        every = self.log_every or trainer.log_every_n_steps or 1
        if trainer.logger is not None and len(self.norms) % every == 0:
            # the step this update makes, as Lightning counts the loss logged for its batch
            trainer.logger.log_metrics({"train/grad_norm": norm,
                                        "train/lr": float(optimizer.param_groups[0]["lr"])},
                                       step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"norms": self.norms}

    def load_state_dict(self, state_dict: dict) -> None:
        self.norms = list(state_dict["norms"])

    def summary(self) -> dict[str, float]:
        if not self.norms:
            return {}
        values = torch.tensor(self.norms, dtype=torch.float64)
        var = float(values.var(unbiased=False))
        return {"grad_norm_mean": float(values.mean()), "grad_norm_var": var}


class LossTracker(L.Callback):
    """Per-step training loss and its exponential moving average; the first step whose
    smoothed loss is at or below ``target_loss`` (smoothing keeps one lucky batch from
    counting as convergence)."""

    def __init__(self, target_loss: float | None = None, smoothing: float = 0.9):
        self.target_loss, self.smoothing = target_loss, smoothing
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.steps_to_target: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach())
        ema = value if not self.smoothed else (
            self.smoothing * self.smoothed[-1] + (1 - self.smoothing) * value)
        self.losses.append(value)
        self.smoothed.append(ema)
        if (self.steps_to_target is None and self.target_loss is not None
                and ema <= self.target_loss):
            self.steps_to_target = len(self.losses)

    def state_dict(self) -> dict:
        return {"losses": self.losses, "smoothed": self.smoothed,
                "steps_to_target": self.steps_to_target}

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses, self.smoothed = list(state_dict["losses"]), list(state_dict["smoothed"])
        self.steps_to_target = state_dict["steps_to_target"]

    def summary(self) -> dict[str, float]:
        if self.target_loss is None:
            return {}
        out = {"target_reached": int(self.steps_to_target is not None)}
        if self.steps_to_target is not None:
            out["steps_to_target"] = self.steps_to_target
        return out
