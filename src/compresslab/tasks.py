"""Tasks: how a batch turns into a training loss and into evaluation metrics.

A dataset names its task; the architecture adapter supplies the logits. Each
task accumulates *sums* during evaluation (so that batches of any size, and
processes in DDP, combine exactly) and turns them into metrics at the end.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.models.architecture import ArchitectureAdapter


class Task:
    #: the metric tables and plots lead with, and whether larger is better
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    #: whether the task reads the model only through its forward pass, so that FSDP may
    #: shard it (:mod:`compresslab.sharding`); a task computing with the weights directly
    #: (``model.end_to_end()``) keeps the model whole in every process
    shardable: ClassVar[bool] = True

    def loss(self, model: nn.Module, adapter: ArchitectureAdapter, batch) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, adapter: ArchitectureAdapter,
                  batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
    logits = logits[:, :-1].flatten(0, 1)
    if logits.dtype in (torch.float16, torch.bfloat16):  # accumulate in at least fp32
        logits = logits.float()
    return F.cross_entropy(logits, tokens[:, 1:].flatten(), reduction=reduction)


class LanguageModelingTask(Task):
    """Next-token prediction; perplexity = exp(total NLL / predicted tokens)."""

    primary_metric, higher_is_better = "ppl", False

    def loss(self, model, adapter, batch):
        return next_token_nll(adapter.logits(model, batch), batch)

    def eval_sums(self, model, adapter, batch):
        nll = next_token_nll(adapter.logits(model, batch), batch, reduction="sum")
        return {"nll": nll.double(), "tokens": torch.tensor(float(batch[:, 1:].numel()),
                                                            dtype=torch.float64)}

    def metrics(self, sums):
        mean = sums["nll"] / sums["tokens"]
        return {"loss": mean, "ppl": math.exp(min(mean, 700.0))}


class ClassificationTask(Task):
    primary_metric, higher_is_better = "acc", True

    def loss(self, model, adapter, batch):
        images, labels = batch
        return F.cross_entropy(adapter.logits(model, images), labels)

    def eval_sums(self, model, adapter, batch):
        images, labels = batch
        logits = adapter.logits(model, images)
        return {"nll": F.cross_entropy(logits.float(), labels, reduction="sum").double(),
                "correct": (logits.argmax(-1) == labels).sum().double(),
                "count": torch.tensor(float(labels.numel()), dtype=torch.float64)}

    def metrics(self, sums):
        return {"loss": sums["nll"] / sums["count"], "acc": sums["correct"] / sums["count"]}


class MatrixRecoveryTask(Task):
    """Fit the end-to-end matrix of a network to a target seen through a mask.

    Training loss: ``1/2 sum_Omega (W - M*)^2 / |Omega|``. Recovery error: the
    same half mean-squared error over the evaluation entries (all entries for
    factorization, the unobserved ones for completion) and the relative
    Frobenius error ``||W - M*||_F / ||M*||_F``.
    """

    primary_metric, higher_is_better = "recovery_mse", False
    shardable = False  # the end-to-end matrix, not a forward pass

    def loss(self, model, adapter, batch):
        residual = (model.end_to_end() - batch["target"]) * batch["mask"]
        return 0.5 * residual.pow(2).sum() / batch["mask"].sum()

    def eval_sums(self, model, adapter, batch):
        target, mask, eval_mask = batch["target"], batch["mask"], batch["eval_mask"]
        residual = model.end_to_end() - target
        sq = residual.pow(2)
        return {"train_sq": (sq * mask).sum(), "train_n": mask.sum(),
                "eval_sq": (sq * eval_mask).sum(), "eval_n": eval_mask.sum(),
                "err_fro_sq": sq.sum(), "target_fro_sq": target.pow(2).sum()}

    def metrics(self, sums):
        return {"loss": 0.5 * sums["train_sq"] / sums["train_n"],
                "recovery_mse": 0.5 * sums["eval_sq"] / sums["eval_n"],
                "recovery_rel": math.sqrt(sums["err_fro_sq"] / sums["target_fro_sq"])}
