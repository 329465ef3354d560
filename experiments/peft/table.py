"""The PEFT table and loss curves from the runs of its grid (experiments/peft/grid.yaml).

    python experiments/peft/table.py --runs outputs/peft_runs/main

Writes ``<tables>/peft.md`` (trainable parameters, val and test exact match, steps to the target
loss, gradient-norm variance; mean ± std over seeds) and ``<tables>/peft_loss.png``
(mean smoothed training loss per row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compresslab.report import aggregate, collect_runs, fmt, fmt_mean_std, line_plot, lookup

ORDER = ["lora_r1", "lora_r2", "lora_r4", "pissa_r1", "pissa_r2", "pissa_r4", "lokr",
         "soka_tau0.1", "soka_tau0.5", "soka_tau0.9",
         "soka_zero_init", "soka_energy"]
METRICS = ["trainable/params", "val/exact_match", "test/exact_match", "finetune/steps_to_target",
           "finetune/target_reached", "finetune/grad_norm_var", "finetune/grad_norm_mean"]
HEADER = ["row", "seeds", "trainable params", "val exact match", "test exact match",
          "steps to target loss",
          "reached", "grad-norm variance", "grad-norm mean"]


def row_order(name: str) -> tuple[int, str]:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def table_rows(records: list[dict]) -> list[list]:
    rows = []
    for group in sorted(aggregate(records, ["row"], METRICS), key=lambda g: row_order(g["row"])):
        params = group["trainable/params"]
        reached = group["finetune/target_reached"]
        rows.append([group["row"], group["n"], fmt(int(params[0])) if params else "-",
                     fmt_mean_std(group["val/exact_match"], 3),
                     fmt_mean_std(group["test/exact_match"], 3),
                     fmt_mean_std(group["finetune/steps_to_target"], 3),
                     f"{round(reached[0] * group['n'])}/{group['n']}" if reached else "-",
                     fmt_mean_std(group["finetune/grad_norm_var"], 3),
                     fmt_mean_std(group["finetune/grad_norm_mean"], 3)])
    return rows


def retarget(records: list[dict], target: float) -> None:
    """Recompute steps to ``target`` from each run's saved smoothed loss curve."""
    for rec in records:
        path = Path(rec["dir"]) / "finetune_loss_curve.json"
        if not path.is_file():
            continue
        smoothed = json.loads(path.read_text())["smoothed"]
        hit = next((i + 1 for i, v in enumerate(smoothed) if v <= target), None)
        rec["metrics"]["finetune/target_reached"] = int(hit is not None)
        rec["metrics"].pop("finetune/steps_to_target", None)
        if hit is not None:
            rec["metrics"]["finetune/steps_to_target"] = hit
        rec["cfg"]["method"]["stages"]["finetune"]["target_loss"] = target


def mean_curves(records: list[dict], every: int | None = None) -> dict[str, tuple[list, list]]:
    """Row -> (steps, smoothed loss averaged over seeds), every ``every`` steps (default:
    about 40 points per curve)."""
    curves: dict[str, list[list[float]]] = {}
    for rec in records:
        path = Path(rec["dir"]) / "finetune_loss_curve.json"
        if path.is_file():
            curves.setdefault(lookup(rec, "row"), []).append(json.loads(path.read_text())
                                                             ["smoothed"])
    out = {}
    for row in sorted(curves, key=row_order):
        n = min(len(c) for c in curves[row])
        steps = list(range(1, n + 1, every or max(1, n // 40)))
        out[row] = (steps, [sum(c[s - 1] for c in curves[row]) / len(curves[row])
                            for s in steps])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the sweep folder")
    parser.add_argument("--tables", default="outputs/tables", help="where to write")
    parser.add_argument("--target", type=float, default=None,
                        help="recompute steps to this target loss from the saved curves")
    args = parser.parse_args()
    records = collect_runs(args.runs)
    if not records:
        raise SystemExit(f"no finished runs below {args.runs}")
    if args.target is not None:
        retarget(records, args.target)
    cfg = records[0]["cfg"]
    target = lookup(records[0], "method.stages.finetune.target_loss")
    steps = lookup(records[0], "method.stages.finetune.max_steps")
    roles = cfg["method"]["stages"]["adapt"]["roles"] or "every attention and MLP linear"
    src, lr = cfg["model"]["source"], lookup(records[0], "method.stages.finetune.optim.lr")
    data = cfg["dataset"]["datamodule"]
    ops = (f"{data['min_steps']}" if data["min_steps"] == data["max_steps"]
           else f"{data['min_steps']}-{data['max_steps']}")
    note = (f"llama_tiny ({src['num_layers']} x {src['hidden_size']}) pre-trained on pycode, "
            f"adapters on {roles} fine-tuned {steps} steps (AdamW lr {lr}) on arithmetic "
            f"({ops} operation(s) on numbers up to {data['max_value']}; "
            f"{data['num_train']} train / {data['num_test']} test problems); mean ± std over "
            f"seeds; steps to target: first step with smoothed training loss <= {target} "
            f"(mean over the seeds that reached it). Runs: {args.runs}\n\n")
    out = Path(args.tables)
    out.mkdir(parents=True, exist_ok=True)
    from compresslab.report import markdown_table

    text = "# SoKA vs LoRA / PiSSA / LoKr\n\n" + note + markdown_table(HEADER, table_rows(records))
    (out / "peft.md").write_text(text)
    line_plot(mean_curves(records), out / "peft_loss.png", xlabel="step",
              ylabel="training loss (EMA 0.9, mean over seeds)", title="arithmetic fine-tuning",
              logy=True)
    print(text)


if __name__ == "__main__":
    main()
