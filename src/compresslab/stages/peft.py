"""Parameter-efficient adapter stages (docs/soka.md).

- :class:`SoKAStage`: Kronecker adapters initialised from the KPSVD of each chosen
  linear, with the number of terms per layer chosen from its spectrum under a global
  trainable-parameter budget.
- :class:`PeftAdapterStage`: the ``peft`` baselines (LoRA, PiSSA, LoKr) on the same
  linears, named through the architecture adapter.
- :class:`AdapterTrainStage`: the shared fine-tuning stage; it trains only what
  requires grad and logs gradient-norm statistics and steps to a target loss.
- :class:`MergeAdaptersStage`: folds every adapter into a plain ``nn.Linear``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from torch import nn

from compresslab.callbacks.training_stats import GradNormStats, LossTracker
from compresslab.compress.kpsvd import KronShape, TermSelector, fit_budget, kpsvd
from compresslab.compress.ratio import lowrank_params
from compresslab.distributed import is_main_process
from compresslab.errors import ConfigError
from compresslab.layers.kronecker import KroneckerAdapterLinear
from compresslab.models.utils import set_module
from compresslab.stages.base import RunContext, Stage
from compresslab.stages.compress import select_linears
from compresslab.stages.train import TrainStage

DEFAULT_ROLES = ("q", "v", "gate", "up", "down")


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()
                                   if p.requires_grad}.values())


def chosen_linears(stage, model: nn.Module, ctx: RunContext) -> dict[str, nn.Module]:
    layers = select_linears(model, ctx.adapter, stage.roles, stage.omit)
    if not layers:
        raise ConfigError(f"stage {stage.name}: no layer matches roles={stage.roles} "
                          f"omit={stage.omit}")
    return layers


class SoKAStage(Stage):
    """Replace each chosen linear by a :class:`KroneckerAdapterLinear` and freeze the rest.

    Terms per layer: ``terms`` for every layer, or the :class:`TermSelector` rule
    (``tau``, ``elbow``, ``combine``, ``k_min``, ``k_max``) on the layer's KPSVD
    spectrum, then :func:`fit_budget` under ``budget_params`` trainable numbers, or
    ``budget_fraction`` x the count of LoRA at rank ``budget_lora_rank`` on the same
    linears. ``splits`` maps a dimension to its Kronecker split, e.g. {128: [8, 16]}
    (default: near square roots). ``init``: ``kpsvd`` (PiSSA-like) | ``zero``.
    """

    def __init__(self, roles: Sequence[str] | None = DEFAULT_ROLES, omit: Sequence[str] = (),
                 init: str = "kpsvd", terms: int | None = None, tau: float = 0.9,
                 elbow: str = "second_difference", combine: str = "max", k_min: int = 1,
                 k_max: int | None = None, budget_params: int | None = None,
                 budget_lora_rank: int | None = None, budget_fraction: float = 1.0,
                 splits: dict | None = None):
        self.roles = list(roles) if roles is not None else None
        self.omit, self.init, self.terms = list(omit), init, terms
        self.selector = TermSelector(tau, elbow, combine, k_min, k_max)
        self.budget_params, self.budget_lora_rank = budget_params, budget_lora_rank
        self.budget_fraction = budget_fraction
        self.splits = {int(k): tuple(v) for k, v in (splits or {}).items()}

    def shape_of(self, layer: nn.Module) -> KronShape:
        return KronShape.for_matrix(layer.out_features, layer.in_features,
                                    self.splits.get(layer.out_features),
                                    self.splits.get(layer.in_features))

    def check(self, model, ctx):
        if self.init not in ("kpsvd", "zero"):
            raise ConfigError(f"stage {self.name}: init must be kpsvd | zero, got {self.init!r}")
        if self.terms is not None and self.terms < 1:
            raise ConfigError(f"stage {self.name}: terms must be at least 1, got {self.terms}")
        if not 0 < self.budget_fraction:
            raise ConfigError(f"stage {self.name}: budget_fraction must be positive")
        self.selector.check()
        for name, layer in chosen_linears(self, model, ctx).items():
            shape = self.shape_of(layer)
            if self.terms is not None and self.terms > shape.max_terms:
                raise ConfigError(f"stage {self.name}: terms={self.terms} exceeds the "
                                  f"{shape.max_terms} Kronecker terms layer {name} has")

    def budget(self, layers: dict[str, nn.Module]) -> int | None:
        if self.budget_params is not None:
            return int(self.budget_params)
        if self.budget_lora_rank is not None:
            lora = sum(lowrank_params(lin.in_features, lin.out_features, self.budget_lora_rank)
                       for lin in layers.values())
            return int(self.budget_fraction * lora)
        return None

    def select_terms(self, layers: dict[str, nn.Module]) -> tuple[dict[str, int], dict]:
        shapes = {n: self.shape_of(lin) for n, lin in layers.items()}
        if self.terms is not None:
            return {n: self.terms for n in layers}, shapes
        spectra = {n: kpsvd(lin.weight, shapes[n]).s for n, lin in layers.items()}
        terms = {n: self.selector(s) for n, s in spectra.items()}
        terms = fit_budget(terms, spectra, {n: s.term_params for n, s in shapes.items()},
                           self.budget(layers), self.selector.k_min)
        return terms, shapes

    def run(self, model, ctx):
        layers = chosen_linears(self, model, ctx)
        terms, shapes = self.select_terms(layers)
        model.requires_grad_(False)
        for name, layer in layers.items():
            adapted = KroneckerAdapterLinear.from_linear(layer, shapes[name], terms[name],
                                                         self.init)
            set_module(model, name, adapted)
            ctx.plan[name] = adapted.plan_entry()
        ctx.log({"trainable/params": trainable_params(model),
                 f"{self.name}/layers": len(layers),
                 f"{self.name}/terms_mean": sum(terms.values()) / len(terms),
                 f"{self.name}/budget": self.budget(layers) or 0})
        return model


class PeftAdapterStage(Stage):
    """A ``peft`` adapter (``config``: a partial ``peft.LoraConfig``/``LoKrConfig``) on the
    linears the architecture adapter names for ``roles``; everything else is frozen."""

    def __init__(self, config, roles: Sequence[str] | None = DEFAULT_ROLES,
                 omit: Sequence[str] = ()):
        self.config = config
        self.roles = list(roles) if roles is not None else None
        self.omit = list(omit)

    def check(self, model, ctx):
        if not callable(self.config):
            raise ConfigError(f"stage {self.name}: config must be a partial peft config "
                              f"(_partial_: true)")
        names = sorted(chosen_linears(self, model, ctx))
        try:  # builds the peft config only (no model): unknown options and values fail here
            self.config(target_modules=names)
        except (TypeError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"stage {self.name}: bad peft config: {reason}") from None

    def run(self, model, ctx):
        model, names = self.wrap(model, ctx)
        ctx.log({"trainable/params": trainable_params(model),
                 f"{self.name}/layers": len(names)})
        return model

    def wrap(self, model, ctx):
        from peft import get_peft_model

        names = sorted(chosen_linears(self, model, ctx))
        peft_model = get_peft_model(model, self.config(target_modules=names))
        return peft_model.base_model.model, names   # the same model, its linears now wrapped

    def rebuild(self, model, ctx):
        return self.wrap(model, ctx)[0]   # peft layers are not in the plan; weights load after


class AdapterTrainStage(TrainStage):
    """Fine-tune what requires grad (the adapters); logs ``<name>/grad_norm_mean``,
    ``<name>/grad_norm_var``, ``<name>/steps_to_target`` (first step whose smoothed
    training loss is <= ``target_loss``), ``<name>/target_reached`` and the loss curve
    (``<name>_loss_curve.json`` in the run folder)."""

    def __init__(self, target_loss: float | None = None, loss_smoothing: float = 0.9,
                 **train_kwargs):
        super().__init__(**train_kwargs)
        self.target_loss, self.loss_smoothing = target_loss, loss_smoothing

    def check(self, model, ctx):
        super().check(model, ctx)
        if not 0 <= self.loss_smoothing < 1:
            raise ConfigError(f"stage {self.name}: loss_smoothing must lie in [0, 1)")

    def run(self, model, ctx):
        if trainable_params(model) == 0:
            raise ConfigError(f"stage {self.name}: nothing to train; put an adapter stage "
                              f"before it")
        grads, losses = GradNormStats(self.log_every), LossTracker(self.target_loss,
                                                                   self.loss_smoothing)
        extra = [grads, losses]
        self.callbacks = [cb for cb in self.callbacks
                          if not isinstance(cb, GradNormStats | LossTracker)] + extra
        model = super().run(model, ctx)
        summary = {**grads.summary(), **losses.summary()}
        ctx.log({f"{self.name}/{k}": v for k, v in summary.items()})
        if ctx.run_dir is not None and is_main_process():
            curve = {"loss": losses.losses, "smoothed": losses.smoothed,
                     "grad_norm": grads.norms, "target_loss": self.target_loss}
            (ctx.run_dir / f"{self.name}_loss_curve.json").write_text(json.dumps(curve))
        return model


class MergeAdaptersStage(Stage):
    """Fold every adapter (SoKA or peft) into a plain ``nn.Linear`` for deployment."""

    def run(self, model, ctx):
        merged = self.merge(model, ctx)
        model.requires_grad_(False)
        ctx.log({f"{self.name}/layers": merged})
        return model

    def rebuild(self, model, ctx):
        self.merge(model, ctx)   # the structure; the merged weights load after
        return model

    def merge(self, model, ctx) -> int:
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = 0
        for name, module in list(model.named_modules()):
            if isinstance(module, KroneckerAdapterLinear):
                set_module(model, name, module.merged())
            elif isinstance(module, BaseTunerLayer):
                module.merge()
                set_module(model, name, module.get_base_layer())
            else:
                continue
            ctx.plan.pop(name, None)
            merged += 1
        return merged

