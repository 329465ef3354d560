"""PELA stages (docs/pela.md): SVD decomposition with the paper's layer choice, and the
intermediate pre-training of the low-rank student against the frozen dense teacher.

Intermediate pre-training loss: ``task + fd_weight * L_FD + wpr_weight * L_WPR``, each
term logged (``<stage>/train/loss_task``, ``..._fd``, ``..._wpr``). The student runs
one forward per step: the task loss asks the adapter for logits, and a capturing adapter
answers with ``logits_and_block_outputs`` so the block features come from the same pass.
"""

from __future__ import annotations

import torch
from torch import nn

from compresslab.compress.pela import (
    WPR_SETTINGS,
    feature_distillation_loss,
    feature_selector,
    rank_from_c,
    weight_perturbation_loss,
    wpr_form,
)
from compresslab.errors import ConfigError
from compresslab.layers.lowrank import LowRankLinear
from compresslab.models.architecture import ArchitectureAdapter
from compresslab.stages.base import RunContext
from compresslab.stages.compress import LowRankStage, select_linears
from compresslab.stages.modules import TrainModule
from compresslab.stages.train import TrainStage


class PelaDecomposeStage(LowRankStage):
    """LowRankStage restricted to linears with ``out_features >= min_out_features``
    (the reference leaves tiny output layers dense). ``c``: PELA's compression ratio
    (parameters divided by c); when given, every rank is the authors'
    ``(in*out) // (c*(in+out))`` and ``ratio`` is not used."""

    def __init__(self, *args, min_out_features: int = 10, c: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_out_features, self.c = min_out_features, c

    def ranks(self, model, ctx):
        if self.c is None:
            return {name: rank for name, rank in super().ranks(model, ctx).items()
                    if model.get_submodule(name).out_features >= self.min_out_features}
        layers = select_linears(model, ctx.adapter, self.roles, self.omit)
        return {name: self.rank_from_c(name, lin) for name, lin in layers.items()
                if lin.out_features >= self.min_out_features}

    def rank_from_c(self, name: str, linear: nn.Module) -> int:
        rank = rank_from_c(linear.in_features, linear.out_features, self.c)
        if rank < 1:
            raise ConfigError(f"stage {self.name}: c={self.c} leaves rank 0 for {name} "
                              f"({linear.out_features}x{linear.in_features}); lower c")
        return rank

    def check(self, model, ctx):
        if self.c is not None and self.rank is not None:
            raise ConfigError(f"stage {self.name}: give either c or rank, not both")
        super().check(model, ctx)


class CapturingAdapter:
    """Wraps an adapter so that ``logits`` also keeps the inputs and block outputs of the
    same forward pass (read back by the distillation term)."""

    def __init__(self, inner: ArchitectureAdapter):
        self.inner = inner
        self.inputs: torch.Tensor | None = None
        self.block_outputs: list[torch.Tensor] = []

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        self.inputs = inputs
        logits, self.block_outputs = self.inner.logits_and_block_outputs(model, inputs)
        return logits

    def __getattr__(self, name):
        return getattr(self.inner, name)


class PelaModule(TrainModule):
    """Student training with feature distillation from ``teacher`` and WPR towards the
    teacher's weights of every low-rank layer (``originals``: layer name -> weight)."""

    def __init__(self, model, adapter, task, optim, total_steps, *, teacher: nn.Module,
                 originals: dict[str, torch.Tensor], fd_weight: float, wpr_weight: float,
                 wpr_eps: float, wpr_form_name: str, features: str):
        super().__init__(model, adapter, task, optim, total_steps)
        self.teacher = teacher.eval().requires_grad_(False)
        self.originals = originals
        self.fd_weight, self.wpr_weight, self.wpr_eps = fd_weight, wpr_weight, wpr_eps
        self.wpr_form, self.selector = wpr_form(wpr_form_name), feature_selector(features)
        self.capture = CapturingAdapter(adapter)
        # WPR reads the low-rank factors after the forward: gathered for the step under FSDP
        self.params_outside_forward = bool(wpr_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode (no dropout) while training
        return self

    def task_loss(self, batch) -> torch.Tensor:
        return self.task.loss(self.model, self.capture, batch)

    def extra_losses(self, batch) -> dict[str, torch.Tensor]:
        losses = {}
        if self.fd_weight:
            with torch.no_grad():
                _, teacher_blocks = self.adapter.logits_and_block_outputs(
                    self.teacher, self.capture.inputs)
            losses["fd"] = self.fd_weight * feature_distillation_loss(
                self.capture.block_outputs, teacher_blocks, self.selector)
        if self.wpr_weight:
            pairs = [(self.model.get_submodule(name).dense_weight(), weight.to(self.device))
                     for name, weight in self.originals.items()]
            losses["wpr"] = self.wpr_weight * weight_perturbation_loss(
                pairs, self.wpr_eps, self.wpr_form)
        return losses


class PelaPretrainStage(TrainStage):
    """Intermediate pre-training of the low-rank model (a TrainStage with FD + WPR).

    ``fd_weight``/``wpr_weight``: weights of the two terms (0 switches a term off; with
    both off this is plain fine-tuning, the ablation's "LRA + fine-tune").
    ``wpr_eps``: the margin subtracted from each layer's perturbation. ``wpr_setting``:
    one of the authors' settings, which replaces ``wpr_weight`` and ``wpr_eps``: ``deit``
    (their DeiT scripts: weight 0, eps 1e-3, i.e. WPR off) | ``swin`` (their Swin scripts:
    weight 1, eps 0); null keeps the two values given. ``wpr_form``: ``max_entry``
    (reference) | ``frobenius``. ``features``: ``blocks`` | ``final``.
    """

    module_class = PelaModule

    def __init__(self, fd_weight: float = 1.0, wpr_weight: float = 1.0, wpr_eps: float = 0.0,
                 wpr_form: str = "max_entry", features: str = "blocks",
                 wpr_setting: str | None = None, **train_kwargs):
        super().__init__(**train_kwargs)
        self.wpr_setting = wpr_setting
        if wpr_setting in WPR_SETTINGS:
            wpr_weight, wpr_eps = WPR_SETTINGS[wpr_setting]
        self.fd_weight, self.wpr_weight, self.wpr_eps = fd_weight, wpr_weight, wpr_eps
        self.wpr_form_name, self.features = wpr_form, features

    @property
    def needs_dense_copy(self) -> bool:
        return bool(self.fd_weight or self.wpr_weight)

    def check(self, model, ctx):
        super().check(model, ctx)
        if self.wpr_setting is not None and self.wpr_setting not in WPR_SETTINGS:
            raise ConfigError(f"stage {self.name}: wpr_setting must be "
                              f"{' | '.join(WPR_SETTINGS)} or null, got {self.wpr_setting!r}")
        for what in ("fd_weight", "wpr_weight", "wpr_eps"):
            if getattr(self, what) < 0:
                raise ConfigError(f"stage {self.name}: {what} must be >= 0, "
                                  f"got {getattr(self, what)}")
        wpr_form(self.wpr_form_name)
        feature_selector(self.features)

    def make_module(self, model: nn.Module, ctx: RunContext) -> TrainModule:
        if not self.needs_dense_copy:  # no FD, no WPR: plain training on the task loss
            return TrainModule(model, ctx.adapter, ctx.data.task, self.optim, self.max_steps)
        originals = low_rank_originals(model, ctx.teacher)
        if self.wpr_weight and not originals:
            raise ConfigError(f"stage {self.name}: WPR needs low-rank layers; put a decompose "
                              f"stage before it")
        return PelaModule(model, ctx.adapter, ctx.data.task, self.optim, self.max_steps,
                          teacher=ctx.teacher, originals=originals, fd_weight=self.fd_weight,
                          wpr_weight=self.wpr_weight, wpr_eps=self.wpr_eps,
                          wpr_form_name=self.wpr_form_name, features=self.features)


def low_rank_originals(model: nn.Module, teacher: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the teacher's dense weight, for every low-rank layer of ``model``."""
    return {name: teacher.get_submodule(name).weight.detach()
            for name, module in model.named_modules() if isinstance(module, LowRankLinear)}

