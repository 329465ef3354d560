"""Deep linear networks (docs/dln.md): plain full-batch gradient descent and the
width-reduced network with spectral initialisation.

:class:`SpectralInitStage` turns an L-layer network of width d into the compressed
network of width ``r_hat`` initialised from the data's surrogate ``M_hat``.
:class:`DeepLinearGDStage` trains either with plain gradient descent (manual
optimisation, several steps per Lightning call), the first and last layers at
``alpha * lr``, stopping at ``max_steps`` or when the training loss drops below
``stop_loss``. Every step it records the training loss, the recovery errors and
the GD wall time (time spent in the steps only, diagnostics excluded); every
``sv_every`` steps the end-to-end singular values; every ``diag_every`` steps the
rank of ``W_l(t) - W_l(0)`` and the count of singular values of ``W_l`` still at eps.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn

from compresslab.compress import dln
from compresslab.distributed import is_main_process
from compresslab.errors import ConfigError
from compresslab.layers import ResizedLinear
from compresslab.stages.base import RunContext, Stage
from compresslab.stages.modules import NonFiniteLossError
from compresslab.stages.optim import OptimConfig
from compresslab.stages.train import fit


def recovery_errors(w: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Half mean-squared error over the evaluation entries and ``||W - M*||_F / ||M*||_F``."""
    residual = w - batch["target"]
    eval_mask = batch.get("eval_mask")
    sq = residual.pow(2)
    mse = 0.5 * float((sq * eval_mask).sum() / eval_mask.sum()) if eval_mask is not None \
        else 0.5 * float(sq.mean())
    return mse, math.sqrt(float(sq.sum() / batch["target"].pow(2).sum()))


def layer_weights(model: nn.Module, adapter) -> list[torch.Tensor]:
    return [lin.weight for lin in adapter.compressible_linears(model).values()]


class DLNRecorder:
    """Per-step trajectory of one training run (kept in memory, written as JSON)."""

    def __init__(self, sv_every: int, diag_every: int, top_k: int, log_every: int,
                 eps_rtol: float = 1e-3, rank_rtol: float = 1e-7):
        self.sv_every, self.diag_every, self.top_k = sv_every, diag_every, top_k
        self.log_every, self.eps_rtol, self.rank_rtol = log_every, eps_rtol, rank_rtol
        self.steps: list[dict[str, float]] = []
        self.sv_steps: list[int] = []
        self.sv: list[list[float]] = []
        self.diag: list[dict[str, Any]] = []
        self.initial: list[torch.Tensor] = []
        self.eps: list[float] = []

    STATE = ("steps", "sv_steps", "sv", "diag", "initial", "eps")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.STATE:
            setattr(self, k, state[k])

    def start(self, weights: list[torch.Tensor]) -> None:
        self.initial = [w.detach().clone() for w in weights]
        self.eps = [float(torch.linalg.svdvals(w).min()) for w in self.initial]

    @torch.no_grad()
    def record(self, iteration: int, loss: float, seconds: float, w: torch.Tensor,
               weights: list[torch.Tensor], batch, logger=None, final: bool = False) -> None:
        """Row ``iteration``: the loss, end-to-end matrix ``w`` and layer ``weights`` all of
        the same iterate (before its update)."""
        mse, rel = recovery_errors(w, batch)
        row = {"step": iteration, "time_s": seconds, "loss": loss, "recovery_mse": mse,
               "recovery_rel": rel}
        self.steps.append(row)
        if not (final or iteration % self.sv_every == 0 or iteration % self.diag_every == 0
                or (logger is not None and iteration % self.log_every == 0)):
            return  # the common case: nothing else is due at this step
        logs = {f"dln/{k}": v for k, v in row.items() if k != "step"}
        if final or iteration % self.sv_every == 0:
            s = torch.linalg.svdvals(w)[:self.top_k]
            self.sv_steps.append(iteration)
            self.sv.append(s.tolist())
            logs.update({f"dln/sv{i}": float(v) for i, v in enumerate(s)})
        if final or iteration % self.diag_every == 0:
            logs.update(self.record_diagnostics(iteration, weights))
        if logger is not None and (final or iteration % self.log_every == 0):
            logger.log_metrics(logs, step=iteration)

    def record_diagnostics(self, iteration: int, weights: list[torch.Tensor]) -> dict:
        ranks = [dln.update_rank(w, w0, self.rank_rtol) for w, w0 in zip(weights, self.initial)]
        at_eps = [dln.count_at_scale(w, eps, self.eps_rtol) for w, eps in zip(weights, self.eps)]
        self.diag.append({"step": iteration, "update_rank": ranks, "at_eps": at_eps})
        return {**{f"dln/update_rank_l{i}": r for i, r in enumerate(ranks)},
                **{f"dln/at_eps_l{i}": c for i, c in enumerate(at_eps)}}

    def first_below(self, key: str, threshold: float) -> dict[str, float] | None:
        return next((row for row in self.steps if row[key] < threshold), None)

    def to_json(self) -> dict[str, Any]:
        columns = {k: [row[k] for row in self.steps] for k in self.steps[0]} if self.steps else {}
        return {**columns, "sv_steps": self.sv_steps, "sv": self.sv, "diagnostics": self.diag,
                "eps": self.eps}


class DeepLinearGD(L.LightningModule):
    """Plain gradient descent, ``steps_per_call`` steps per Lightning training step.

    Layer ``l`` steps ``W_l -= lrs[l] * grad_l``, no optimiser object, so that Lightning's
    per-call overhead does not hide the cost of the step itself on small problems. The
    gradients come from the closed form of :class:`~compresslab.compress.dln_gd.ProductGD`
    (``gradients="closed_form"``, when the model and task allow it) or from
    ``torch.autograd.grad`` (``"autograd"``). Each step is counted in Lightning's
    optimiser-step progress, so ``global_step`` (and every callback keyed on it) counts
    gradient steps.
    """

    def __init__(self, model: nn.Module, adapter, task, lrs: list[float], max_steps: int,
                 steps_per_call: int, stop_loss: float | None, recorder: DLNRecorder,
                 gradients: str = "closed_form"):
        super().__init__()
        self.model, self.adapter, self.task = model, adapter, task
        self.lrs, self.max_steps, self.steps_per_call = lrs, max_steps, steps_per_call
        self.stop_loss, self.recorder, self.gradients = stop_loss, recorder, gradients
        self.automatic_optimization = False
        self.iteration, self.gd_seconds = 0, 0.0
        self.finished, self._resumed = False, False
        self.stepper = None

    def configure_optimizers(self):
        return None

    def configure_model(self):
        """Under FSDP the deep linear net stays whole in every process (not sharded): the
        plain GD step differentiates with respect to the layer weights themselves, which
        sharded parameters would not be, and every process takes the same full-batch step,
        as under DDP. The hook exists because Lightning's ModelParallelStrategy requires it."""

    def on_save_checkpoint(self, checkpoint):
        checkpoint["compresslab"] = {"iteration": self.iteration, "gd_seconds": self.gd_seconds,
                                     "finished": self.finished,
                                     "recorder": self.recorder.state_dict()}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint["compresslab"]
        self.iteration, self.gd_seconds = state["iteration"], state["gd_seconds"]
        self.finished = state["finished"]
        self.recorder.load_state_dict(state["recorder"])
        self._resumed = True

    def on_train_start(self):
        self.weights = layer_weights(self.model, self.adapter)
        if not self._resumed:  # a resumed run keeps the initial weights it recorded
            self.recorder.start(self.weights)

    def make_stepper(self, batch):
        from compresslab.compress import dln_gd

        plain = dln_gd.plain_weights(self.model, self.adapter.compressible_linears(
            self.model).values())
        if self.gradients == "closed_form" and plain is not None and closed_form_task(self.task):
            return dln_gd.ProductGD(plain, self.lrs, batch)
        return dln_gd.AutogradGD(self.model, self.adapter, self.task, self.weights, self.lrs,
                                 batch)

    def count_step(self) -> None:
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def training_step(self, batch, batch_idx):
        if self.finished:  # resumed from the checkpoint written when training ended
            self.trainer.should_stop = True
            return None
        if self.stepper is None:
            self.stepper = self.make_stepper(batch)
        for _ in range(self.steps_per_call):
            if self.gd_iteration(batch):
                self.finished = True
                self.trainer.should_stop = True
                return None
        return None

    def gd_iteration(self, batch) -> bool:
        """Loss at the current iterate, its record, then the step to the next one unless the
        run is done (returns True then). ``time_s`` counts the GD arithmetic only."""
        start = time.perf_counter()
        value = self.stepper.forward()
        self.gd_seconds += time.perf_counter() - start
        if not math.isfinite(value):
            raise NonFiniteLossError(f"training loss is {value} at step {self.iteration}")
        done = self.iteration >= self.max_steps or (
            self.stop_loss is not None and value < self.stop_loss)
        self.recorder.record(self.iteration, value, self.gd_seconds, self.stepper.product,
                             self.weights, batch, self.logger, final=done)
        if done:
            return True
        start = time.perf_counter()
        self.stepper.update()
        self.gd_seconds += time.perf_counter() - start
        self.iteration += 1
        self.count_step()
        return False


def closed_form_task(task) -> bool:
    """Tasks whose loss :class:`~compresslab.compress.dln_gd.EndToEndLoss` reproduces."""
    from compresslab.data.matrix_recovery import MatrixSensingTask
    from compresslab.tasks import MatrixRecoveryTask

    return type(task) in (MatrixRecoveryTask, MatrixSensingTask)


GRADIENTS = ("closed_form", "autograd")


def plain_gd_lr(optim: OptimConfig, stage: str) -> float:
    """The learning rate of an optimiser block that must describe plain gradient descent."""
    plain = (optim.name == "sgd" and optim.momentum == 0 and optim.weight_decay == 0
             and optim.schedule == "constant" and not optim.warmup_steps and not optim.grad_clip)
    if not plain:
        raise ConfigError(f"stage {stage}: deep linear networks train with plain gradient "
                          "descent (optim: name sgd, momentum 0, weight_decay 0, schedule "
                          "constant, warmup_steps 0, grad_clip null)")
    return optim.lr


class DeepLinearGDStage(Stage):
    """Train a deep linear network with plain full-batch GD (see the module docstring).

    ``alpha``: learning-rate factor of the first and last layers. ``top_k``: singular
    values recorded (null: twice the data's rank ``r``). ``learned_fraction``: a
    singular value counts as learned once it reaches this fraction of the target's.
    ``thresholds``: recovery errors whose first iteration and GD seconds are reported.
    ``rank_rtol``: singular values of ``W_l(t) - W_l(0)`` above this fraction of the
    largest count towards its rank (1e-7: in the first and last layers the second r of the
    2r updated directions are only ~eps^2 of the largest change, a few 1e-6 at eps=1e-2,
    while the d - 2r uniformly shrunk directions sit near 1e-9); ``eps_rtol``: a singular
    value of ``W_l(t)`` within this relative distance of eps counts as still at eps.
    ``gradients``: ``closed_form`` (the product's gradients without autograd, for
    bias-free linear layers and the matrix-recovery losses; anything else falls back) or
    ``autograd``.
    """

    def __init__(self, max_steps: int = 100000, optim: dict | None = None, alpha: float = 1.0,
                 steps_per_call: int = 1, stop_loss: float | None = None, log_every: int = 10,
                 sv_every: int = 10, diag_every: int = 100, top_k: int | None = None,
                 learned_fraction: float = 0.5, thresholds: list[float] = (1e-10,),
                 rank_rtol: float = 1e-7, eps_rtol: float = 1e-3,
                 callbacks: list | None = None, checkpoint_every: int | None = None,
                 gradients: str = "closed_form"):
        self.max_steps, self.alpha, self.steps_per_call = max_steps, alpha, steps_per_call
        self.gradients = gradients
        self.optim = OptimConfig.from_cfg(optim or {"name": "sgd", "lr": 1.0,
                                                    "schedule": "constant", "grad_clip": None})
        self.stop_loss, self.log_every, self.top_k = stop_loss, log_every, top_k
        self.sv_every, self.diag_every = sv_every, diag_every
        self.learned_fraction, self.thresholds = learned_fraction, list(thresholds)
        self.rank_rtol, self.eps_rtol = rank_rtol, eps_rtol
        self.callbacks = list(callbacks or [])
        self.checkpoint_every = checkpoint_every

    def check(self, model, ctx):
        plain_gd_lr(self.optim, self.name)
        if not hasattr(model, "end_to_end"):
            raise ConfigError(f"stage {self.name}: {type(model).__name__} is not a deep linear "
                              "network (no end_to_end matrix); use model=dln")
        for key in ("max_steps", "steps_per_call", "log_every", "sv_every", "diag_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stage {self.name}: {key} must be at least 1")
        if not self.alpha > 0:
            raise ConfigError(f"stage {self.name}: alpha must be positive, got {self.alpha}")
        if self.gradients not in GRADIENTS:
            raise ConfigError(f"stage {self.name}: gradients must be one of {GRADIENTS}, "
                              f"got {self.gradients!r}")
        if not 0 < self.learned_fraction <= 1:
            raise ConfigError(f"stage {self.name}: learned_fraction must lie in (0, 1]")

    def layer_lrs(self, depth: int) -> list[float]:
        lr = plain_gd_lr(self.optim, self.name)
        if depth == 1:
            return [lr]
        return [self.alpha * lr] + [lr] * (depth - 2) + [self.alpha * lr]

    def run(self, model, ctx):
        start = time.perf_counter()
        depth = len(ctx.adapter.compressible_linears(model))
        rank = getattr(ctx.data, "r", 1)
        recorder = DLNRecorder(self.sv_every, self.diag_every, self.top_k or 2 * rank,
                               self.log_every, self.eps_rtol, self.rank_rtol)
        module = DeepLinearGD(model, ctx.adapter, ctx.data.task, self.layer_lrs(depth),
                              self.max_steps, self.steps_per_call, self.stop_loss, recorder,
                              self.gradients)
        for cb in self.callbacks:
            if hasattr(cb, "file_prefix") and not cb.file_prefix.startswith(f"{self.name}_"):
                cb.file_prefix = f"{self.name}_{cb.file_prefix}"
        model.train()
        with warnings.catch_warnings():  # no optimiser object is intended (plain GD steps)
            warnings.filterwarnings("ignore", message=".*returned `None`, this fit will run")
            fit(self, module, ctx, callbacks=self.callbacks,
                checkpoint_every=self.checkpoint_every, max_epochs=-1, max_steps=-1,
                limit_val_batches=0, log_every_n_steps=1)
        model.eval()
        if is_main_process():
            (ctx.run_dir / f"{self.name}_trajectory.json").write_text(
                json.dumps(recorder.to_json()))
        ctx.log({f"{self.name}/time_s": time.perf_counter() - start,
                 **self.summary(module, ctx, depth)})
        return model

    def summary(self, module: DeepLinearGD, ctx: RunContext, depth: int) -> dict[str, Any]:
        rec, name = module.recorder, self.name
        last = rec.steps[-1]
        out = {f"{name}/steps": module.iteration, f"{name}/gd_time_s": module.gd_seconds,
               f"{name}/ms_per_step": 1e3 * module.gd_seconds / max(1, module.iteration),
               f"{name}/final_loss": last["loss"], f"{name}/final_recovery_mse":
               last["recovery_mse"], f"{name}/final_recovery_rel": last["recovery_rel"]}
        for threshold in self.thresholds:
            for key in ("recovery_mse", "recovery_rel"):
                hit = rec.first_below(key, threshold)
                out[f"{name}/steps_to_{key}_{threshold:g}"] = hit["step"] if hit else -1
                out[f"{name}/seconds_to_{key}_{threshold:g}"] = hit["time_s"] if hit else -1.0
        out.update(self.learning_summary(rec, ctx, depth))
        final = rec.diag[-1]
        out.update({f"{name}/update_rank_l{i}": r for i, r in enumerate(final["update_rank"])})
        out.update({f"{name}/at_eps_l{i}": c for i, c in enumerate(final["at_eps"])})
        return out

    def learning_summary(self, rec: DLNRecorder, ctx: RunContext, depth: int) -> dict[str, Any]:
        """When each of the target's top-r singular values was learned, and the prediction
        ``t_i`` of :func:`dln.predicted_learning_time` (middle-layer lr, eps of layer 0)."""
        batch, rank = ctx.data.batch, getattr(ctx.data, "r", 1)
        sigmas = torch.linalg.svdvals(batch["target"])[:min(rank, rec.top_k)]
        times = dln.learning_times(rec.sv_steps, torch.tensor(rec.sv), sigmas,
                                   self.learned_fraction)
        eta = self.optim.lr * dln.mean_curvature(batch)
        out: dict[str, Any] = {f"{self.name}/learned_in_order": int(dln.learned_in_order(times))}
        for i, (t, sigma) in enumerate(zip(times, sigmas.tolist())):
            out[f"{self.name}/learn_step_s{i}"] = -1 if t is None else t
            out[f"{self.name}/predicted_step_s{i}"] = dln.predicted_learning_time(
                sigma, eta, rec.eps[0], depth)
        return out


class SpectralInitStage(Stage):
    """Replace an L-layer deep linear network by the width-``width`` network initialised
    from the surrogate ``M_hat`` of the data (``width`` null: twice the data's ``r``;
    ``init_scale``: eps). ``init``: ``paper`` (every layer scaled by eps, the paper's
    formula) or ``notebook`` (the authors' depth-2 notebook: ``[V^T, U]`` unscaled)."""

    def __init__(self, width: int | None = None, init_scale: float = 1e-2,
                 init: str = "paper"):
        self.width, self.init_scale, self.init = width, init_scale, init

    def resolve_width(self, ctx: RunContext) -> int:
        if self.width is not None:
            return self.width
        rank = getattr(ctx.data, "r", None)
        if rank is None:
            raise ConfigError(f"stage {self.name}: dataset has no rank r; set the width")
        return 2 * int(rank)

    def check(self, model, ctx):
        if not hasattr(model, "end_to_end"):
            raise ConfigError(f"stage {self.name}: needs a deep linear network (model=dln)")
        layers = list(ctx.adapter.compressible_linears(model).values())
        if len(layers) < 2:
            raise ConfigError(f"stage {self.name}: the compressed network needs depth >= 2")
        width = self.resolve_width(ctx)
        rows, cols = layers[-1].out_features, layers[0].in_features
        if not 1 <= width <= min(rows, cols):
            raise ConfigError(f"stage {self.name}: width {width} must be in [1, "
                              f"{min(rows, cols)}] for a {rows} x {cols} target")
        if not self.init_scale > 0:
            raise ConfigError(f"stage {self.name}: init_scale must be positive")
        if self.init not in dln.SPECTRAL_INITS:
            raise ConfigError(f"stage {self.name}: init must be one of {dln.SPECTRAL_INITS}, "
                              f"got {self.init!r}")
        if self.init == "notebook" and len(layers) != 2:
            raise ConfigError(f"stage {self.name}: init=notebook is the authors' depth-2 "
                              f"start; this network has depth {len(layers)}")

    def run(self, model, ctx):
        from compresslab.models.utils import count_params, set_module

        width, dense = self.resolve_width(ctx), count_params(model)
        layers = ctx.adapter.compressible_linears(model)
        m_hat = dln.surrogate(ctx.data.batch)
        weights = dln.spectral_init(m_hat, width, len(layers), self.init_scale, self.init)
        for (name, old), weight in zip(layers.items(), weights):
            new = ResizedLinear(weight.shape[1], weight.shape[0], bias=False,
                                dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(weight)
            set_module(model, name, new)
            ctx.plan[name] = new.plan_entry()
        self.rebuild(model, ctx)
        ctx.log({f"{self.name}/width": width,
                 f"{self.name}/params_ratio": 1 - count_params(model) / dense,
                 f"{self.name}/model_params_ratio": 1 - count_params(model) / dense})
        return model

    def rebuild(self, model, ctx):
        """The layer sizes ``dims`` follow the resized layers (also on resume)."""
        if hasattr(model, "dims"):
            layers = list(ctx.adapter.compressible_linears(model).values())
            model.dims = [layers[0].in_features] + [lin.out_features for lin in layers]
        return model
