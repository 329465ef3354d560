"""Singular-value trajectories of chosen matrices during training.

Every ``every_n_steps`` optimiser steps the callback records the top-``top_k``
singular values of each chosen matrix: a module's weight (a low-rank layer
counts as its product ``B A``), or ``end_to_end`` for a deep linear network.
Values go to the logger as scalars ``sv/<matrix>/s<i>``; at the end of training
the callback writes ``<run>/<stage>_singular_values.png`` and ``.json`` and,
under W&B, one line-series chart per matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compresslab.callbacks.periodic import PeriodicRecorder
from compresslab.models.utils import weight_of

END_TO_END = "end_to_end"


def matrix_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    if name == END_TO_END:
        return model.end_to_end()
    return weight_of(model.get_submodule(name))


class SingularValueTrajectory(PeriodicRecorder):
    def __init__(self, every_n_steps: int = 50, top_k: int = 10,
                 matrices: list[str] | None = None, max_default_matrices: int = 3,
                 file_prefix: str = "singular_values"):
        super().__init__(every_n_steps)
        self.top_k = top_k
        self.matrices = list(matrices) if matrices else None
        self.max_default_matrices = max_default_matrices
        self.file_prefix = file_prefix
        self.values: dict[str, list[list[float]]] = {}

    def _names(self, pl_module) -> list[str]:
        if self.matrices is None:
            model = pl_module.model
            if hasattr(model, "end_to_end"):
                self.matrices = [END_TO_END]
            else:
                names = list(pl_module.adapter.compressible_linears(model))
                self.matrices = names[:self.max_default_matrices]
        return self.matrices

    def sample(self, trainer, pl_module) -> dict[str, float]:
        scalars = {}
        for name in self._names(pl_module):
            s = torch.linalg.svdvals(matrix_of(pl_module.model, name).double())[:self.top_k]
            self.values.setdefault(name, []).append(s.tolist())
            scalars.update({f"sv/{name}/s{i}": float(v) for i, v in enumerate(s)})
        return scalars

    def finish(self, trainer, pl_module) -> None:
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.file_prefix}.json").write_text(
            json.dumps({"steps": self.steps, "values": self.values}))
        self._log_wandb(trainer, self.plot(out / f"{self.file_prefix}.png"))

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from compresslab.report import save_figure

        names = list(self.values)
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names):
            series = torch.tensor(self.values[name])
            for i in range(series.shape[1]):
                ax.plot(self.steps, series[:, i].clamp_min(1e-300), lw=1.2)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("singular value")
            ax.set_title(name, fontsize=9)
        return save_figure(fig, path, dpi=120)

    def _log_wandb(self, trainer, png: Path) -> None:
        """Line-series charts per matrix and the PNG (W&B only)."""
        from compresslab.tracking import log_charts, log_media, wandb_run

        if wandb_run(trainer.logger) is None:
            return
        import wandb

        charts = {}
        for name, rows in self.values.items():
            series = list(map(list, zip(*rows)))
            charts[f"sv/{name}"] = wandb.plot.line_series(
                xs=self.steps, ys=series, keys=[f"s{i}" for i in range(len(series))],
                title=f"singular values of {name}", xname="step")
        log_charts(trainer.logger, charts)
        log_media(trainer.logger, {"sv/plot": png})
