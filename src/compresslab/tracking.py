"""Experiment tracking: what a run sends to its logger besides the stage metrics.

- the full resolved config (nested, so ``method.ratio`` or ``seed`` can be filtered on);
- each trained stage's curves under its own prefix and step metric
  (``pretrain/train/loss`` against ``pretrain/step``, see :class:`StageLogger`), because
  every fit's step counter starts again at 0 and one shared key would overlap;
- the dense-vs-compressed results table, images, and optionally the compressed model.

W&B gets everything; CSV gets the config (``hparams.yaml``) and the prefixed curves.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: metric-name parts whose best value is the smallest / the largest (W&B summaries)
LOWER_IS_BETTER = ("loss", "ppl", "mse", "err", "rel")
HIGHER_IS_BETTER = ("acc", "score", "exact")


def unwrap(logger):
    """The run's logger under a :class:`StageLogger` (or ``logger`` itself)."""
    return logger.inner if isinstance(logger, StageLogger) else logger


def wandb_run(logger):
    """The active W&B run behind ``logger``, or None (another logger, none, or finished)."""
    from lightning.pytorch.loggers import WandbLogger

    from compresslab.distributed import is_main_process

    inner = unwrap(logger)
    if not isinstance(inner, WandbLogger) or not is_main_process():
        return None
    import wandb

    return inner.experiment if wandb.run is not None else None


def summary_of(key: str) -> str:
    """W&B summary of a curve: its best value where 'best' has a direction, else the last."""
    name = key.rsplit("/", 1)[-1]
    if any(part in name for part in LOWER_IS_BETTER):
        return "min"
    if any(part in name for part in HIGHER_IS_BETTER):
        return "max"
    return "last"


class StageLogger(Logger):
    """The run's logger as one trained stage sees it: every key gets the stage's prefix
    and each row carries ``<prefix>/step``, the stage's own step (W&B ``define_metric``
    ties each key to it and sets its summary). The run's logger is finished by the
    pipeline, not by each fit; checkpoints are not uploaded."""

    def __init__(self, inner: Logger, prefix: str):
        super().__init__()
        self.inner, self.prefix = inner, prefix
        self.step_key = f"{prefix}/step"
        self._defined: set[str] = set()

    @property
    def name(self):
        return self.inner.name

    @property
    def version(self):
        return self.inner.version

    @property
    def save_dir(self):
        return self.inner.save_dir

    @property
    def log_dir(self):
        return getattr(self.inner, "log_dir", None)

    @property
    def experiment(self):
        return self.inner.experiment

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {self.key(k): v for k, v in metrics.items() if k != "epoch"}
        if not row:
            return
        if step is not None:
            row[self.step_key] = step
        run = wandb_run(self.inner)
        if run is None:
            self.inner.log_metrics(row, step=step)
            return
        self._define(run, row)
        run.log(row)  # not WandbLogger.log_metrics: its trainer/global_step restarts per fit

    def _define(self, run, row: dict) -> None:
        if self.step_key not in self._defined:
            run.define_metric(self.step_key, hidden=True)
            self._defined.add(self.step_key)
        for key in row.keys() - self._defined:
            # an exact definition: WandbLogger's own "*" -> trainer/global_step is a glob
            run.define_metric(key, step_metric=self.step_key, summary=summary_of(key))
            self._defined.add(key)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """The run's config is logged once by the pipeline (:func:`log_config`)."""

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.save()

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        """Stage checkpoints stay local (resume files, not results)."""


def stage_logger(logger: Logger | None, prefix: str) -> StageLogger | None:
    return None if logger is None else StageLogger(unwrap(logger), prefix)


def log_media(logger, images: dict[str, Path | str]) -> None:
    """PNG files as W&B images (keys get the stage prefix under a :class:`StageLogger`)."""
    run = wandb_run(logger)
    if run is None:
        return
    import wandb

    if isinstance(logger, StageLogger):
        images = {logger.key(k): v for k, v in images.items()}
    run.log({k: wandb.Image(str(p)) for k, p in images.items()})


def log_charts(logger, charts: dict[str, Any]) -> None:
    """W&B chart objects (e.g. ``wandb.plot.line_series``), prefixed like :func:`log_media`."""
    run = wandb_run(logger)
    if run is None:
        return
    if isinstance(logger, StageLogger):
        charts = {logger.key(k): v for k, v in charts.items()}
    run.log(charts)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain nested data (unresolved only where a value cannot be
    resolved outside a Hydra job, e.g. a config composed in a test)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 (tracking never stops a run)
        return OmegaConf.to_container(cfg, resolve=False)


def log_config(logger, cfg: DictConfig) -> None:
    """The full resolved config as the run's config (W&B) or ``hparams.yaml`` (CSV)."""
    if logger is None:
        return
    logger.log_hyperparams(resolved_config(cfg))


def log_results(logger, cfg: DictConfig, metrics: dict[str, Any], task,
                run_dir: Path) -> None:
    """The results table (dense vs compressed per metric) and, with
    ``logger.log_model=true``, the ``compressed/`` folder as a model artifact."""
    run = wandb_run(logger)
    if run is None:
        return
    import wandb

    from compresslab.report import run_table_rows

    rows = [list(r) for r in run_table_rows(metrics, task)]
    run.log({"results": wandb.Table(columns=["quantity", "dense", "compressed"], data=rows)})
    folder = run_dir / "compressed"
    if cfg.logger.get("log_model") and folder.is_dir():
        artifact = wandb.Artifact(f"{cfg.run_name}".replace("/", "-"), type="model",
                                  metadata={"method": cfg.method.name, "model": cfg.model.name})
        artifact.add_dir(str(folder))
        run.log_artifact(artifact)


# -- console and run.log -----------------------------------------------------------------

def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StageTimer:
    """Logs a stage's start and end with its time (console and ``run.log``)."""

    def __init__(self, name: str, index: int, total: int):
        self.name, self.where = name, f"stage {index + 1}/{total} {name}"
        self.seconds = 0.0

    def __enter__(self):
        log.info("%s: start", self.where)
        self._start = time.perf_counter()
        return self

    def __exit__(self, kind, exc, tb):
        self.seconds = time.perf_counter() - self._start
        log.info("%s: %s after %s", self.where, "failed" if kind else "done",
                 duration(self.seconds))
        return False


def announce_pretraining(cfg: DictConfig, model, ctx, steps: int) -> None:
    """Before a base model is pre-trained (once; then cached): what, how long, where."""
    per_step = estimate_step_seconds(model, ctx) if cfg.trainer.get("accelerator") == "cpu" \
        else None
    eta = f", about {duration(per_step * steps)} here" if per_step else ""
    log.info("pre-training the base model %s on %s: %d steps%s (once: cached under %s)",
             cfg.model.name, getattr(ctx.data, "name", type(ctx.data).__name__), steps, eta,
             cfg.paths.base)


def estimate_step_seconds(model, ctx, probes: int = 2) -> float | None:
    """Seconds of one training step (forward, backward and an AdamW step on one batch, on a
    copy of the model, random state untouched); None when the probe cannot run."""
    import copy

    import torch
    from torch.utils.data import DataLoader

    try:
        batch = next(iter(DataLoader(ctx.data.split("train"), batch_size=ctx.data.batch_size)))
        probe = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW(probe.parameters())

        def step():
            optimizer.zero_grad()
            ctx.data.task.loss(probe, ctx.adapter, batch).backward()
            optimizer.step()

        with torch.random.fork_rng():
            step()  # warm-up (allocations, optimizer state)
            start = time.perf_counter()
            for _ in range(probes):
                step()
        return (time.perf_counter() - start) / probes
    except Exception:  # noqa: BLE001 (an estimate only: never stops the run)
        return None
