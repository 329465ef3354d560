"""Stages of the SVD-LLM family and of learned singular-spectrum selection (docs/spectrum.md).

- :class:`ShortlistStage`: a low-rank stage that keeps ``factor`` times the target rank
  of every matrix (capped by the rank at which the factors would cost the dense layer).
- :class:`SpectrumStage`: gates on the shortlisted components, trained with the task
  loss (+ optional distillation to the dense model) + a budget penalty; then the global
  parameter-weighted selection, amplification (kept gates become free scales), a short
  fine-tuning, and the gates folded into per-matrix-rank factors.
- :class:`FactorFinetuneStage`: SVD-LLM's optional update, one factor at a time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.callbacks.periodic import PeriodicRecorder
from compresslab.compress.ratio import check_ratio, rank_for_ratio
from compresslab.compress.spectrum import (
    GatedLowRankLinear,
    amplify_rule,
    expected_params,
    kept_params,
    make_gate,
    penalty_rule,
    rank_heatmap,
    score_rule,
    select_components,
)
from compresslab.distributed import is_main_process
from compresslab.errors import ConfigError
from compresslab.layers.lowrank import LowRankLinear
from compresslab.models.utils import set_module
from compresslab.stages.base import RunContext
from compresslab.stages.compress import LowRankStage
from compresslab.stages.modules import TrainModule
from compresslab.stages.optim import OptimConfig
from compresslab.stages.train import TrainStage, fit


def breakeven_rank(in_features: int, out_features: int) -> int:
    """The largest rank whose factors cost no more than the dense layer."""
    return max(1, in_features * out_features // (in_features + out_features))


class ShortlistStage(LowRankStage):
    """Coarse shortlist: rank ``ceil(factor * k)`` per matrix, ``k`` the target rank,
    capped by the full rank and by :func:`breakeven_rank`."""

    def __init__(self, *args, factor: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def ranks(self, model, ctx):
        out = {}
        for name, k in super().ranks(model, ctx).items():
            lin = model.get_submodule(name)
            cap = min(lin.in_features, lin.out_features,
                      breakeven_rank(lin.in_features, lin.out_features))
            out[name] = max(k, min(math.ceil(self.factor * k), cap))
        return out

    def check(self, model, ctx):
        if self.factor < 1:
            raise ConfigError(f"stage {self.name}: factor must be >= 1, got {self.factor}")
        super().check(model, ctx)


class SpectrumModule(TrainModule):
    """Task loss (+ distillation) + budget penalty over the gates of ``gated`` layers.

    Logs per step ``<stage>/expected_ratio`` (soft: from the gate values),
    ``<stage>/selected_ratio`` (what the global selection would keep now) and the budget
    term ``train/loss_budget``."""

    def __init__(self, model, adapter, task, optim, total_steps, *, gated, budget, dense,
                 penalty, penalty_weight, score, stage, teacher=None, distill_weight=0.0,
                 temperature=1.0, hard=False):
        super().__init__(model, adapter, task, optim, total_steps)
        self.gated, self.budget, self.dense = gated, budget, dense
        self.penalty, self.penalty_weight, self.score = penalty, penalty_weight, score
        self.hard = hard
        self.stage, self.teacher = stage, teacher
        self.distill_weight, self.temperature = distill_weight, temperature
        self.costs = {name: layer.cost for name, layer in gated.items()}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def extra_losses(self, batch):
        losses = {}
        if self.penalty_weight:
            losses["budget"] = self.penalty_weight * penalty_rule(self.penalty)(
                expected_params(self.gated), self.budget)
        if self.distill_weight and self.teacher is not None:
            t = self.temperature
            with torch.no_grad():
                target = F.log_softmax(self.adapter.logits(self.teacher, batch) / t, -1)
            student = F.log_softmax(self.adapter.logits(self.model, batch) / t, -1)
            losses["distill"] = self.distill_weight * t * t * F.kl_div(
                student.flatten(0, -2), target.flatten(0, -2), log_target=True,
                reduction="batchmean")
        return losses

    def selection(self) -> dict[str, torch.Tensor]:
        """What the global selection keeps with the current gates."""
        with torch.no_grad():
            return select_components({n: g.gates() for n, g in self.gated.items()},
                                     self.costs, self.budget, self.score)

    #: the budget term and the selection read the gates outside the forward pass
    params_outside_forward = True

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)  # under FSDP: gather the gates
        if self.hard:  # the forward pass sees exactly the model the selection would keep
            for name, mask in self.selection().items():
                layer = self.gated[name]
                layer.mask = mask.to(layer.logits.dtype)

    def on_train_end(self):
        for layer in self.gated.values():
            layer.mask = None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():
            soft = float(expected_params(self.gated))
        masks = self.selection()
        self.log_dict({f"{self.stage}/expected_ratio": 1 - soft / self.dense,
                       f"{self.stage}/selected_ratio":
                           1 - kept_params(masks, self.costs) / self.dense},
                      on_step=True, on_epoch=False, batch_size=self._batch_size(batch))
        return loss


class GateTrajectory(PeriodicRecorder):
    """Records the gates of the matrices ``names`` every ``every`` steps; logs their mean
    and the fraction above 1/2, and writes ``<prefix>_gates.json``/``.png`` at the end."""

    def __init__(self, names: list[str], every: int, prefix: str, out: Path):
        super().__init__(every)
        self.names, self.prefix, self.out = names, prefix, out
        self.values: dict[str, list[list[float]]] = {n: [] for n in names}

    def sample(self, trainer, pl_module) -> dict[str, float]:
        scalars = {}
        for name in self.names:
            g = pl_module.gated[name].gates().double()
            self.values[name].append(g.tolist())
            scalars[f"{self.prefix}/gate_mean/{name}"] = float(g.mean())
            scalars[f"{self.prefix}/gate_above_half/{name}"] = float((g > 0.5).double().mean())
        return scalars

    def finish(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.prefix}_gates.json").write_text(
            json.dumps({"steps": self.steps, "values": self.values}))
        png = plot_gate_trajectories(self.steps, self.values,
                                     self.out / f"{self.prefix}_gates.png")
        log_wandb_images(trainer.logger, {f"{self.prefix}/gates": png})


def plot_gate_trajectories(steps, values, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresslab.report import save_figure

    names = list(values)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        series = torch.tensor(values[name])
        for i in range(series.shape[1]):
            ax.plot(steps, series[:, i], lw=0.8, color=f"C{i % 10}", alpha=0.7)
        ax.set_xlabel("step")
        ax.set_ylabel("gate (component order = singular value order)")
        ax.set_title(name, fontsize=9)
    return save_figure(fig, path, dpi=110)


def log_wandb_images(logger, images: dict[str, Path]) -> None:
    from compresslab.tracking import log_media

    log_media(logger, images)


class SpectrumStage(TrainStage):
    """Learned singular-spectrum selection on the low-rank layers of the model.

    ``ratio``: the target; the parameter budget is what uniform ranks
    ``rank_for_ratio(in, out, ratio, round_to, round_slack)`` cost on the same layers,
    rounded exactly as the SVD-family rows round theirs, so the result has the parameter
    count of the uniform baselines (within one component). ``max_steps`` and
    ``optim``: the gate search. See docs/spectrum.md for every option.
    """

    def __init__(self, ratio: float, round_to: int = 1, round_slack: float | None = None,
                 gate: str = "sigmoid", init_gate: float = 0.9,
                 penalty: str = "hinge", penalty_weight: float = 10.0,
                 distill_weight: float = 0.0, temperature: float = 1.0,
                 search_forward: str = "hard", score: str = "gate",
                 amplify: str = "fold", finetune_steps: int = 50,
                 finetune_params: str = "gates", finetune_optim: dict | None = None,
                 track_matrices: int = 3, track_every: int = 10, **train_kwargs):
        super().__init__(**train_kwargs)
        self.ratio, self.gate, self.init_gate = ratio, gate, init_gate
        self.round_to, self.round_slack = round_to, round_slack
        self.penalty, self.penalty_weight = penalty, penalty_weight
        self.distill_weight, self.temperature = distill_weight, temperature
        self.search_forward = search_forward
        self.score, self.amplify = score, amplify
        self.finetune_steps, self.finetune_params = finetune_steps, finetune_params
        self.finetune_optim = OptimConfig.from_cfg(finetune_optim or {"lr": 1e-3})
        self.track_matrices, self.track_every = track_matrices, track_every

    @property
    def needs_dense_copy(self) -> bool:
        return bool(self.distill_weight)

    def check(self, model, ctx):
        super().check(model, ctx)
        check_ratio(self.ratio, f"stage {self.name}: ratio")
        make_gate(self.gate)
        penalty_rule(self.penalty)
        score_rule(self.score)
        amplify_rule(self.amplify)
        if self.finetune_params not in ("gates", "factors"):
            raise ConfigError(f"stage {self.name}: finetune_params must be gates | factors, "
                              f"got {self.finetune_params!r}")
        for what in ("penalty_weight", "distill_weight", "finetune_steps"):
            if getattr(self, what) < 0:
                raise ConfigError(f"stage {self.name}: {what} must be >= 0")
        if self.search_forward not in ("soft", "hard"):
            raise ConfigError(f"stage {self.name}: search_forward must be soft | hard, "
                              f"got {self.search_forward!r}")

    # -- the three phases ------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> dict[str, GatedLowRankLinear]:
        low = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        if not low:
            raise ConfigError(f"stage {self.name}: no low-rank layers; put a shortlist stage "
                              f"before it")
        model.requires_grad_(False)
        gated = {}
        for name, layer in low.items():
            gated[name] = GatedLowRankLinear(layer, self.gate, self.init_gate)
            set_module(model, name, gated[name])
        return gated

    def budget(self, gated: dict[str, GatedLowRankLinear]) -> tuple[float, int]:
        """(parameter budget, dense parameters of the same layers)."""
        budget = dense = 0
        for layer in gated.values():
            n, m = layer.in_features, layer.out_features
            rank = rank_for_ratio(n, m, self.ratio, self.round_to, self.round_slack)
            budget += max(1, rank) * (n + m)
            dense += n * m
        return float(budget), dense

    def fit(self, module: TrainModule, ctx: RunContext, steps: int, callbacks: list,
            phase: str) -> None:
        module.model.train()
        fit(self, module, ctx, phase=phase, steps=steps, callbacks=callbacks, max_steps=steps,
            max_epochs=-1, log_every_n_steps=self.log_every, limit_val_batches=0,
            gradient_clip_val=module.optim.grad_clip)
        module.model.eval()

    def module(self, model, ctx, gated, budget, dense, optim, steps, search: bool):
        """The search module (budget term, hard selection) or the fine-tuning one."""
        return SpectrumModule(
            model, ctx.adapter, ctx.data.task, optim, steps, gated=gated, budget=budget,
            dense=dense, penalty=self.penalty,
            penalty_weight=self.penalty_weight if search else 0.0, score=self.score,
            stage=self.name, teacher=ctx.teacher, distill_weight=self.distill_weight,
            temperature=self.temperature, hard=search and self.search_forward == "hard")

    def search(self, model, ctx, gated, budget, dense) -> None:
        for layer in gated.values():
            layer.logits.requires_grad_(True)
        tracker = GateTrajectory(list(gated)[:self.track_matrices], self.track_every,
                                 self.name, Path(ctx.run_dir))
        self.fit(self.module(model, ctx, gated, budget, dense, self.optim, self.max_steps,
                             search=True), ctx, self.max_steps, [tracker], "search")

    def sparsify(self, gated, budget) -> dict[str, torch.Tensor]:
        costs = {n: g.cost for n, g in gated.items()}
        masks = select_components({n: g.gates().detach() for n, g in gated.items()}, costs,
                                  budget, self.score)
        rule = amplify_rule(self.amplify)
        for name, layer in gated.items():
            layer.keep(masks[name], rule(layer.gates().detach()))
        return masks

    def finetune(self, model, ctx, gated, budget, dense) -> None:
        model.requires_grad_(False)
        for layer in gated.values():
            layer.logits.requires_grad_(True)
            if self.finetune_params == "factors":
                layer.first.weight.requires_grad_(True)
                layer.second.weight.requires_grad_(True)
        self.fit(self.module(model, ctx, gated, budget, dense, self.finetune_optim,
                             self.finetune_steps, search=False), ctx, self.finetune_steps, [],
                 "finetune")

    def run(self, model, ctx):
        start = time.perf_counter()
        gated = self.wrap(model)
        budget, dense = self.budget(gated)
        shortlisted = {n: len(g.logits) for n, g in gated.items()}
        self.search(model, ctx, gated, budget, dense)
        masks = self.sparsify(gated, budget)
        if self.finetune_steps:
            self.finetune(model, ctx, gated, budget, dense)
        for name, layer in gated.items():
            folded = layer.fold()
            set_module(model, name, folded)
            ctx.plan[name] = folded.plan_entry()
        model.requires_grad_(True)
        kept = kept_params(masks, {n: g.cost for n, g in gated.items()})
        ranks = {n: int(m.sum()) for n, m in masks.items()}
        ctx.log({f"{self.name}/params_ratio": 1 - kept / dense,
                 f"{self.name}/budget_ratio": 1 - budget / dense,
                 f"{self.name}/params_kept": kept, f"{self.name}/budget_params": budget,
                 f"{self.name}/time_s": time.perf_counter() - start,
                 **{f"{self.name}/rank/{n}": r for n, r in ranks.items()}})
        self.write_ranks(model, ctx, ranks, shortlisted)
        return model

    def write_ranks(self, model, ctx, ranks: dict[str, int], shortlisted: dict[str, int]):
        """``<stage>_ranks.json`` and the heat map ``<stage>_ranks.png`` in the run folder."""
        names = {id(m): n for n, m in model.named_modules()}
        grid, full = {}, {}
        for b, block in enumerate(ctx.adapter.blocks(model)):
            for role, lin in ctx.adapter.block_linears(block).items():
                name = names[id(lin)]
                if name in ranks:
                    grid[(b, role)] = ranks[name]
                    full[(b, role)] = min(lin.in_features, lin.out_features)
        out = Path(ctx.run_dir)
        if not is_main_process():  # several processes (DDP): only the main one writes
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}_ranks.json").write_text(json.dumps(
            {"ranks": ranks, "shortlisted": shortlisted}, indent=1))
        png = rank_heatmap(grid, full, out / f"{self.name}_ranks.png",
                           title=f"{self.name}: rank per layer (ratio {self.ratio})")
        log_wandb_images(ctx.logger, {f"{self.name}/ranks": png})


class FactorFinetuneStage(TrainStage):
    """SVD-LLM's optional update: train the low-rank factors one at a time on the task
    loss, ``max_steps`` each, in ``order`` (``right`` = A, (rank, in); ``left`` = B)."""

    FACTORS = {"right": "first", "left": "second"}

    def __init__(self, order: tuple[str, ...] = ("right", "left"), **train_kwargs):
        super().__init__(**train_kwargs)
        self.order = list(order)

    def check(self, model, ctx):
        super().check(model, ctx)
        unknown = [f for f in self.order if f not in self.FACTORS]
        if unknown or not self.order:
            raise ConfigError(f"stage {self.name}: order must list right | left, "
                              f"got {self.order}")

    def run(self, model, ctx):
        low = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        if not low:
            raise ConfigError(f"stage {self.name}: no low-rank layers to fine-tune")
        start = time.perf_counter()
        for factor in self.order:
            model.requires_grad_(False)
            for layer in low:
                getattr(layer, self.FACTORS[factor]).weight.requires_grad_(True)
            model = super().run(model, ctx, phase=factor)
        model.requires_grad_(True)
        ctx.log({f"{self.name}/time_s": time.perf_counter() - start})
        return model
