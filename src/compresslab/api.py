"""Compression as a library call: stages applied to a model and its data, no run folder.

    from compresslab.api import compress_model
    from compresslab.compress.decomposer import PlainSVD
    from compresslab.stages.compress import LowRankStage

    result = compress_model(model, {"compress": LowRankStage(PlainSVD(), ratio=0.4)}, data)
    result.model, result.plan, result.metrics

``run.py`` (:mod:`compresslab.pipeline`) wraps exactly this loop with what makes a run: the
configs, the base model, the run folder with resume, evaluation and logging. The
benchmark, the tests and notebooks call it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compresslab import tracking
from compresslab.errors import ConfigError
from compresslab.models.architecture import adapter_for
from compresslab.run_folder import stage_key
from compresslab.seeding import derive_seed
from compresslab.stages.base import RunContext, Stage

#: what stages read from a run's config when there is no run: no progress bars, training
#: on the CPU (``configs/trainer/cpu.yaml``)
LIBRARY_CONFIG = {
    "progress": False, "checkpoint_every": None,
    "trainer": {"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1,
                "precision": "32-true", "enable_checkpointing": False,
                "enable_model_summary": False, "enable_progress_bar": False,
                "num_sanity_val_steps": 0},
}


@dataclass
class Compressed:
    model: nn.Module
    plan: dict[str, dict[str, Any]]   # module -> saved-form entry (compresslab.layers)
    metrics: dict[str, Any]


def named_stages(stages: Mapping[str, Stage] | Sequence[Stage]) -> list[Stage]:
    """The stages in order, each with its ``name`` (the mapping's key, else its own) and key."""
    items = stages.items() if isinstance(stages, Mapping) else \
        [(stage.name, stage) for stage in stages]
    named = []
    for index, (name, stage) in enumerate(items):
        if not isinstance(stage, Stage):
            raise ConfigError(f"stage {name} is not a Stage ({type(stage).__name__})")
        stage.name, stage.key = name, stage_key(index, name)
        named.append(stage)
    return named


def context(model: nn.Module, data, cfg: DictConfig | dict | None = None,
            run_dir: str | Path | None = None, logger=None) -> RunContext:
    """A run context for ``model`` and ``data`` (a datamodule, or anything with its
    ``split``/``task``/``check``) outside a run: :data:`LIBRARY_CONFIG` unless ``cfg``."""
    cfg = OmegaConf.create(LIBRARY_CONFIG if cfg is None else cfg)
    return RunContext(cfg=cfg, run_dir=Path(run_dir) if run_dir else None,
                      adapter=adapter_for(model), data=data, logger=logger)


def compress_model(model: nn.Module, stages: Mapping[str, Stage] | Sequence[Stage],
                   data=None, *, ctx: RunContext | None = None, seed: int = 0,
                   start: int = 0, check: bool = True,
                   after_stage: Callable[[int, Stage, nn.Module], None] | None = None
                   ) -> Compressed:
    """Apply ``stages`` to ``model`` in order and return the model, its plan and metrics.

    Each stage's randomness depends on ``seed`` and its place only (not on what ran
    before in the process), so ``start`` can skip stages finished earlier (resume) and
    still give the same result; ``after_stage(index, stage, model)`` runs after each
    (the pipeline saves the stage there). ``check``: each stage's :meth:`Stage.check`
    first (the pipeline already checked them on a weightless skeleton)."""
    stages = named_stages(stages)
    ctx = ctx if ctx is not None else context(model, data)
    if check:
        for stage in stages[start:]:
            stage.check(model, ctx)
    for index, stage in enumerate(stages):
        if index < start:
            continue
        L.seed_everything(derive_seed(int(seed), "stage", index, stage.name), verbose=False)
        with tracking.StageTimer(stage.name, index, len(stages)) as timer:
            model = stage.run(model, ctx)
        ctx.metrics.setdefault(f"{stage.name}/time_s", timer.seconds)
        if after_stage is not None:
            after_stage(index, stage, model)
    return Compressed(model, ctx.plan, ctx.metrics)
