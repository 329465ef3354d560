"""Stage interface and the run context every stage receives.

A stage takes the model and returns the (possibly new) model. It may check its
settings against the model's structure first (``check``, called on a model
skeleton before any real work), and it records what it did in
``ctx.metrics`` and, when it changes the structure, in ``ctx.plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from compresslab.data.base import TaskDataModule
from compresslab.models.architecture import ArchitectureAdapter


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    adapter: ArchitectureAdapter
    data: TaskDataModule
    logger: Any | None = None            # a Lightning logger, or None
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, dict[str, Any]] = field(default_factory=dict)   # module -> entry
    teacher: nn.Module | None = None     # frozen copy of the dense model, when asked for
    last_saved: str | None = None        # folder of the newest finished stage's saved state
    choices: dict[str, Any] = field(default_factory=dict)  # dataset/base model and why

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record metrics for ``metrics.json`` and send them to the logger."""
        self.metrics.update(metrics)
        if self.logger is not None:
            numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            if numeric:
                self.logger.log_metrics(numeric, step=step)

    def trainer(self, callbacks: list | None = None, logger: Any = True,
                label: str | None = None, **overrides) -> L.Trainer:
        """A Lightning Trainer from ``cfg.trainer`` with this run's logger (or the one given,
        e.g. a stage's :class:`~compresslab.tracking.StageLogger`; False: none) and a
        progress bar named ``label``."""
        from hydra.utils import instantiate

        from compresslab.callbacks.progress import progress_callbacks

        logger = self.logger if logger is True else logger
        return instantiate(self.cfg.trainer, logger=logger or False,
                           callbacks=progress_callbacks(self.cfg, label) + list(callbacks or []),
                           default_root_dir=str(self.run_dir), **overrides)


class Stage:
    """Base class; ``name`` is set by the pipeline from the stage's key in the config,
    ``key`` (``<index>-<name>``, unique in the run) names its checkpoint folder."""

    name: str = "stage"
    key: str | None = None
    #: False for stages that only measure: no model copy is saved when they finish
    changes_model: bool = True

    def check(self, model: nn.Module, ctx: RunContext) -> None:
        """Raise ConfigError if the settings cannot work on this model (no real work)."""

    def check_data(self, ctx: RunContext) -> None:
        """Raise ConfigError if the loaded data cannot serve this stage (e.g. fewer
        calibration samples than asked for); called after :meth:`check`, once the data is
        loaded and before any model is built or trained."""

    def run(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        raise NotImplementedError

    def rebuild(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """On resume, after this stage finished in an earlier attempt: re-create the
        structure it leaves that ``ctx.plan`` does not describe (the plan is applied
        before, the saved tensors are loaded after). Default: nothing."""
        return model
