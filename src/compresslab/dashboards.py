"""W&B dashboards as code (``wandb-workspaces``): one saved workspace per paper table.

Each board filters the project to its experiment's W&B group and has the panels a reader
of that table needs: the metric against the compression ratio or trainable parameters and
against the parameter count (runs grouped by method), each trained stage's learning curves
(loss, learning rate, gradient norm, against the stage's own step) and, where a stage
records them, the singular-value trajectories and their PNGs. Every key named here is one
that runs log (checked offline by tests/test_tracking.py against real offline runs).

    make dashboards WANDB_ENTITY=<entity>        # online: saves every board
    python -m compresslab.dashboards --entity <entity> [--project compresslab] [pela ...]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Board:
    """What one paper table's workspace shows."""

    name: str                       # the paper table (make table-<name>)
    title: str
    group: str                      # the W&B group its runs are in (experiment preset)
    metric: str                     # the table's metric (a summary key)
    stages: tuple[str, ...] = ()    # trained stages' log prefixes (learning curves)
    images: tuple[str, ...] = ()    # PNG keys (singular values, gates, ranks)
    trajectories: dict[str, tuple[str, ...]] = field(default_factory=dict)  # prefix -> keys
    by_config: tuple[str, ...] = ("method.ratio",)       # metric against these config keys
    by_summary: tuple[str, ...] = ("params/compressed",)  # ... and these summary metrics


VIT_SV = tuple(f"pretrain/sv/{m}/s{i}" for m in ("blocks.0.attn.qkv",) for i in range(8))

BOARDS = {
    "pela": Board("pela", "PELA ablation: accuracy vs ratio", "pela", "test/acc",
                  stages=("base_pretrain", "pretrain", "finetune"),
                  images=("pretrain/sv/plot",), trajectories={"pretrain": VIT_SV}),
    "spectrum": Board("spectrum", "SVD family vs learned spectrum: perplexity vs ratio",
                      "spectrum", "test/ppl",
                      stages=("base_pretrain", "spectrum_search", "spectrum_finetune"),
                      images=("spectrum/ranks",)),
    "peft": Board("peft", "SoKA vs LoRA/PiSSA/LoKr: exact match on arithmetic",
                  "peft_arithmetic", "test/exact_match", stages=("base_pretrain", "finetune"),
                  by_config=(), by_summary=("trainable/params",)),
    "numprune": Board("numprune", "Numerical pruning: perplexity vs sparsity", "numprune",
                      "test/ppl", stages=("base_pretrain",)),
}

RATIO, METHOD = "method.ratio", "method.name"


def workspace(board: Board, entity: str, project: str):
    """The board as a ``wandb_workspaces`` Workspace (built offline; ``.save()`` uploads)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    versus = [(key, wr.Config(key)) for key in board.by_config] + [
        (key, wr.SummaryMetric(key)) for key in board.by_summary]
    results = [wr.ScatterPlot(title=f"{board.metric} vs {key}", x=x,
                              y=wr.SummaryMetric(board.metric)) for key, x in versus]
    if RATIO in board.by_config:
        results.append(wr.ScatterPlot(title="achieved ratio vs asked", x=wr.Config(RATIO),
                                      y=wr.SummaryMetric("params/ratio")))
    sections = [ws.Section(name="results", is_open=True, panels=results)]
    for stage in board.stages:
        sections.append(ws.Section(name=f"{stage} learning curves", panels=[
            wr.LinePlot(title=f"{stage} {curve}", x=f"{stage}/step", y=[f"{stage}/train/{curve}"],
                        log_y=curve == "loss")
            for curve in ("loss", "lr", "grad_norm")]))
    for prefix, keys in board.trajectories.items():
        sections.append(ws.Section(name=f"{prefix} singular values", panels=[
            wr.LinePlot(title=f"{prefix} singular values", x=f"{prefix}/step", y=list(keys),
                        log_y=True)]))
    if board.images:
        sections.append(ws.Section(name="figures", panels=[
            wr.MediaBrowser(title="figures", media_keys=list(board.images))]))
    return ws.Workspace(
        entity=entity, project=project, name=board.title, sections=sections,
        runset_settings=ws.RunsetSettings(filters=f"Config('group') = '{board.group}'",
                                          groupby=[expr.Config(METHOD)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compresslab.dashboards",
                                     description="Save the paper tables' W&B workspaces.")
    parser.add_argument("boards", nargs="*", default=list(BOARDS), help=", ".join(BOARDS))
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="compresslab")
    args = parser.parse_args(argv)
    unknown = [b for b in args.boards if b not in BOARDS]
    if unknown:
        print(f"error: unknown board(s) {', '.join(unknown)} ({', '.join(BOARDS)})",
              file=sys.stderr)
        return 2
    for name in args.boards:
        view = workspace(BOARDS[name], args.entity, args.project).save()
        print(f"{name}: {view.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
