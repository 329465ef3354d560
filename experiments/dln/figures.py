"""``make fig-dln``: the width-reduced deep linear network figures and table (docs/dln.md).

Runs every configuration below through ``run.py`` (one folder each under
``--runs``; a finished folder is reused), then draws from the runs' per-step
trajectories (``train_trajectory.json``):

- ``dln_<problem>_iters.png`` / ``dln_<problem>_seconds.png``: recovery error of the
  original and the compressed network vs iterations and vs GD seconds, for
  factorization, completion and sensing;
- ``dln_alpha.png`` / ``dln_alpha_seconds.png``: iterations / GD seconds to the stopping
  loss vs alpha (compressed network; the original as a reference line);
- ``dln_depth.png``: completion error for L = 2, 3, original and compressed;
- ``dln_incremental.png``: end-to-end singular values of the original network on
  factorization with the learned times and the predicted ``t_i ~ 1/(lr sigma_i eps)``;
- ``dln.md``: iterations and seconds to 1e-10 per problem, final errors, the
  learning-time and layer diagnostics, the nonlinear table (MLP on digits: plain,
  with a deep linear head, with the compressed head) and the settings of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from compresslab.report import fmt, line_plot, markdown_table  # noqa: E402

NETWORKS = {"original": ["method=dln_original"], "compressed": ["method=dln_compressed"]}
#: problem -> (experiment overrides, the recovery error it plots)
PROBLEMS = {
    # lr 20 for 15k steps instead of lr 1 for 1e5: the same gradient flow, 20x fewer steps
    "factorization": (["experiment=dln_factorization", "method.stages.train.max_steps=15000",
                       "method.stages.train.optim.lr=20", "method.stages.train.log_every=1000"],
                      "recovery_mse"),
    "completion": (["experiment=dln_completion"], "recovery_mse"),
    # the paper's size (d=200, r=5, m=4000, lr 20); the loss levels off just above 1e-12
    # (~1.5k-2.5k steps in), so the budget is 4000 steps instead of a cap that is never used
    "sensing": (["experiment=dln_sensing", "method.stages.train.max_steps=4000",
                 "method.stages.train.log_every=500"], "recovery_rel"),
}
ALPHAS = [0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 9.75]
# stop at train loss 1e-10 (the reference notebook's tol for this ablation): at p=0.2 the
# compressed network's loss levels off at 2e-12..4e-12 (its r extra modes freeze at ~4e-4),
# so a 1e-12 stop is never reached and every alpha would run to the step cap
ALPHA_BASE = ["experiment=dln_completion", "group=dln_alpha", "dataset.datamodule.p=0.2",
              "method.stages.train.stop_loss=1e-10"]
NONLINEAR = {"MLP": [], "MLP + DLN head": ["model.source.head_depth=3"],
             "MLP + compressed DLN head": ["model.source.head_depth=3",
                                           "model.source.head_width=20"]}
# alpha 2 (reference notebook): with the completion default alpha 5 the outer layers step
# 250 and the compressed L=3 network is past the stability edge of its largest mode
# (3 alpha^(2/3) lr sigma_1^(4/3) / d^2 = 2.4 > 2); budget 25000 steps (500 x 50 in the reference)
DEPTH_BASE = ["experiment=dln_completion", "group=dln_depth", "dataset.datamodule.r=10",
              "method.stages.train.optim.lr=50", "method.stages.train.max_steps=25000",
              "method.alpha=2.0"]


COLLECT_ONLY = False  # --collect-only: draw from the finished runs, start none


class Missing(Exception):
    """A run that has not finished (with --collect-only)."""


def run_one(runs: Path, name: str, overrides: list[str]) -> Path:
    """``run.py`` with ``overrides`` into ``runs/name`` unless it already finished."""
    folder = runs / name
    if (folder / "metrics.json").is_file():
        return folder
    if COLLECT_ONLY:
        raise Missing(name)
    cmd = [sys.executable, str(REPO / "run.py"), *overrides, f"hydra.run.dir={folder}",
           "progress=false", "print_table=false", f"run_name=dln-{name}"]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    return folder


def load(folder: Path) -> dict:
    return {"metrics": json.loads((folder / "metrics.json").read_text()),
            "traj": json.loads((folder / "train_trajectory.json").read_text())}


def thin(xs: list, ys: list, points: int = 300) -> tuple[list, list]:
    step = max(1, len(xs) // points)
    return xs[::step] + xs[-1:], ys[::step] + ys[-1:]


def problem_figures(runs: Path, out: Path) -> list[list]:
    rows = []
    for problem, (overrides, metric) in PROBLEMS.items():
        curves = {net: load(run_one(runs, f"{problem}-{net}", overrides + extra))
                  for net, extra in NETWORKS.items()}
        for axis, key in (("iters", "step"), ("seconds", "time_s")):
            series = {net: thin(r["traj"][key], r["traj"][metric]) for net, r in curves.items()}
            line_plot(series, out / f"dln_{problem}_{axis}.png", logy=True,
                      xlabel="iteration" if key == "step" else "GD seconds", ylabel=metric,
                      title=f"{problem}: {metric}")
        for net, r in curves.items():
            m = r["metrics"]
            rows.append([problem, net, m["train/steps"], m["train/gd_time_s"],
                         m["train/ms_per_step"], m["train/steps_to_recovery_mse_1e-10"],
                         m["train/seconds_to_recovery_mse_1e-10"], m["train/final_loss"],
                         m["train/final_recovery_mse"], m["train/final_recovery_rel"],
                         m["params/compressed"]])
        rows.append(compare_row(problem, curves, metric))
    return rows


def compare_row(problem: str, curves: dict, metric: str) -> list:
    """Speed-up to the original's final error, and whether the compressed network's
    error is never worse at any iteration both recorded."""
    orig, comp = curves["original"]["traj"], curves["compressed"]["traj"]
    final = orig[metric][-1]
    hit = next((t for t, e in zip(comp["time_s"], comp[metric]) if e <= final), None)
    n = min(len(orig[metric]), len(comp[metric]))
    never_worse = all(c <= o * (1 + 1e-9) for c, o in zip(comp[metric][:n], orig[metric][:n]))
    speedup = orig["time_s"][-1] / hit if hit else float("nan")
    return [problem, "compressed vs original", f"time to original's final {metric}: "
            f"{fmt(hit) if hit else 'never'} s vs {fmt(orig['time_s'][-1])} s "
            f"({fmt(speedup)}x)", "", "", "", "", "", f"never worse ({metric}): {never_worse}",
            "", ""]


def alpha_figure(runs: Path, out: Path) -> list[list]:
    """Iterations to the stopping loss vs alpha (compressed), the original as reference;
    ``s_{r+1}``: the largest end-to-end singular value beyond the target's rank at the end
    (the modes that keep the loss from going much lower)."""
    runs_by_label = {"original": ALPHA_BASE + NETWORKS["original"],
                     **{alpha: ALPHA_BASE + NETWORKS["compressed"] + [f"method.alpha={alpha}"]
                        for alpha in ALPHAS}}
    rows, xs, iters, secs = [], [], [], []
    for label, overrides in runs_by_label.items():
        r = load(run_one(runs, f"alpha-{label}", overrides))
        m, rank = r["metrics"], sum(1 for k in r["metrics"] if k.startswith("train/learn_step_s"))
        rows.append([label, m["train/steps"], m["train/gd_time_s"], m["train/final_loss"],
                     m["train/final_recovery_mse"], m["train/steps_to_recovery_mse_1e-10"],
                     r["traj"]["sv"][-1][rank]])
        if label != "original":
            xs.append(label)
            iters.append(m["train/steps"])
            secs.append(m["train/gd_time_s"])
    orig = rows[0]
    line_plot({"compressed (p=0.2)": (xs, iters), "original": (xs, [orig[1]] * len(xs))},
              out / "dln_alpha.png", xlabel="alpha", ylabel="iterations to train loss < 1e-10",
              title="alpha ablation (completion p=0.2)", logy=True)
    line_plot({"compressed (p=0.2)": (xs, secs), "original": (xs, [orig[2]] * len(xs))},
              out / "dln_alpha_seconds.png", xlabel="alpha",
              ylabel="GD seconds to train loss < 1e-10",
              title="alpha ablation (completion p=0.2)", logy=True)
    return rows


def depth_figure(runs: Path, out: Path) -> list[list]:
    rows, series = [], {}
    for depth in (2, 3):
        for net, extra in NETWORKS.items():
            r = load(run_one(runs, f"depth{depth}-{net}",
                             DEPTH_BASE + extra + [f"model.source.depth={depth}"]))
            series[f"L={depth} {net}"] = thin(r["traj"]["step"], r["traj"]["recovery_mse"])
            m = r["metrics"]
            rows.append([depth, net, m["train/steps"], m["train/gd_time_s"],
                         m["train/steps_to_recovery_mse_1e-10"],
                         m["train/seconds_to_recovery_mse_1e-10"], m["train/final_loss"],
                         m["train/final_recovery_mse"]])
    line_plot(series, out / "dln_depth.png", xlabel="iteration", ylabel="recovery_mse",
              title="depth ablation (completion, r=10, lr=50, alpha 2)", logy=True)
    return rows


def nonlinear_rows(runs: Path) -> list[list]:
    rows = []
    for label, extra in NONLINEAR.items():
        name = "nonlinear-" + label.lower().replace(" + ", "-").replace(" ", "_")
        folder = run_one(runs, name, ["experiment=dln_nonlinear", *extra])
        m = json.loads((folder / "metrics.json").read_text())
        rows.append([label, m["test/acc"], m["train/time_s"], m["params/compressed"]])
    return rows


def incremental_figure(runs: Path, out: Path) -> list[list]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = load(run_one(runs, "factorization-original", PROBLEMS["factorization"][0]
                     + NETWORKS["original"]))
    traj, m = r["traj"], r["metrics"]
    rank = sum(1 for k in m if k.startswith("train/learn_step_s"))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    values = list(zip(*traj["sv"]))
    rows = []
    for i in range(rank):
        line, = ax.plot(traj["sv_steps"], values[i], lw=1.2)
        learned, predicted = m[f"train/learn_step_s{i}"], m[f"train/predicted_step_s{i}"]
        ax.axvline(predicted, color=line.get_color(), ls=":", lw=0.8)
        rows.append([i, values[i][-1], learned, predicted])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("end-to-end singular value")
    ax.set_title("factorization, original: s_i(t); dotted: predicted t_i", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "dln_incremental.png", dpi=130)
    plt.close(fig)
    return rows


def diagnostics_rows(runs: Path) -> list[list]:
    rows = []
    for folder in sorted(p for p in runs.iterdir() if (p / "metrics.json").is_file()):
        m = json.loads((folder / "metrics.json").read_text())
        if "train/learned_in_order" not in m:  # not a deep linear network run
            continue
        ranks = [m[k] for k in sorted(k for k in m if k.startswith("train/update_rank_l"))]
        at_eps = [m[k] for k in sorted(k for k in m if k.startswith("train/at_eps_l"))]
        rows.append([folder.name, m.get("train/learned_in_order"), ranks, at_eps,
                     loss_increases(folder)])
    return rows


def loss_increases(folder: Path) -> int | str:
    """GD steps after which the training loss went up (0 for a stable step size)."""
    path = folder / "train_trajectory.json"
    if not path.is_file():
        return ""
    loss = json.loads(path.read_text())["loss"]
    return sum(1 for a, b in zip(loss, loss[1:]) if b > a * (1 + 1e-9))


def settings_lines() -> list[str]:
    lines = [f"- {p}: `{' '.join(o)}` + `method=dln_original|dln_compressed`"
             for p, (o, _) in PROBLEMS.items()]
    lines.append(f"- alpha ablation: `{' '.join(ALPHA_BASE)}` + `method=dln_original`, and "
                 f"`method=dln_compressed` with `method.alpha` in {ALPHAS}")
    lines.append(f"- depth ablation: `{' '.join(DEPTH_BASE)}` + `method=dln_original|"
                 "dln_compressed` with `model.source.depth` in 2, 3")
    lines.append("- nonlinear: `experiment=dln_nonlinear` + "
                 + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in NONLINEAR.items()))
    return lines


def prepare(runs: Path, section: str) -> None:
    """Only run one section's configurations (``--prepare``: sections in parallel)."""
    jobs = {"factorization": lambda: [run_one(runs, f"factorization-{n}", PROBLEMS[
                "factorization"][0] + e) for n, e in NETWORKS.items()],
            "completion": lambda: [run_one(runs, f"completion-{n}", PROBLEMS["completion"][0]
                                           + e) for n, e in NETWORKS.items()],
            "sensing": lambda: [run_one(runs, f"sensing-{n}", PROBLEMS["sensing"][0] + e)
                                for n, e in NETWORKS.items()],
            "alpha": lambda: alpha_figure(runs, Path("/tmp")),
            "depth": lambda: depth_figure(runs, Path("/tmp")),
            "nonlinear": lambda: nonlinear_rows(runs)}
    jobs[section]()


def section(draw, *args) -> list[list]:
    """A section's rows, or one row naming the first unfinished run (--collect-only)."""
    try:
        return draw(*args)
    except (Missing, FileNotFoundError) as missing:
        return [[f"not run yet: {missing}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="outputs/dln_runs", type=Path)
    parser.add_argument("--out", default="outputs/tables", type=Path)
    parser.add_argument("--prepare", default=None, help="only run one section's runs: "
                        "factorization, completion, sensing, alpha, depth or nonlinear")
    parser.add_argument("--collect-only", action="store_true",
                        help="start no run; leave out sections whose runs are unfinished")
    args = parser.parse_args()
    if args.prepare:
        return prepare(args.runs, args.prepare)
    global COLLECT_ONLY
    COLLECT_ONLY = args.collect_only
    args.out.mkdir(parents=True, exist_ok=True)
    problems = section(problem_figures, args.runs, args.out)
    alphas = section(alpha_figure, args.runs, args.out)
    depths = section(depth_figure, args.runs, args.out)
    incremental = section(incremental_figure, args.runs, args.out)
    nonlinear = section(nonlinear_rows, args.runs)
    text = ["# Width-reduced deep linear networks (docs/dln.md)\n",
            "GD seconds: time inside the gradient steps only (1 CPU thread, shared machine).\n",
            "Iterations: until the training loss is below the stop (completion, sensing: "
            "1e-12) or the step budget. 'to 1e-10': first iteration / GD seconds with "
            "recovery_mse < 1e-10 (-1: never).\n",
            markdown_table(["problem", "network", "iterations", "GD s", "ms/iter",
                            "iters to 1e-10", "s to 1e-10", "final loss", "final recovery_mse",
                            "final recovery_rel", "params"], problems),
            "\n## alpha ablation (completion p=0.2, stop at train loss < 1e-10)\n",
            "s_{r+1}: largest end-to-end singular value beyond rank r at the end.\n",
            markdown_table(["alpha", "iterations", "GD s", "final loss", "final recovery_mse",
                            "iters to 1e-10", "s_{r+1}"], alphas),
            "\n## depth ablation (completion r=10, lr=50, C-DLN alpha 2)\n",
            markdown_table(["L", "network", "iterations", "GD s", "iters to 1e-10",
                            "s to 1e-10", "final loss", "final recovery_mse"], depths),
            "\n## incremental learning (factorization, original)\n",
            markdown_table(["i", "final s_i", "learned at (s_i >= sigma_i/2)",
                            "predicted 1/(lr_eff sigma_i eps)"], incremental),
            "\n## nonlinear: MLP on digits (800 AdamW steps, seed 0)\n",
            markdown_table(["model", "test acc", "train s", "params"], nonlinear),
            "\n## layer diagnostics at the end of each run\n",
            "rank(W_l - W_l(0)): singular values above rank_rtol = 1e-7 of the largest. "
            "Loss increases: GD steps after which the training loss went up (a step size "
            "past the stability edge).\n",
            markdown_table(["run", "learned in order", "rank(W_l - W_l(0))",
                            "singular values still at eps", "loss increases"],
                           diagnostics_rows(args.runs)),
            "\n## settings\n", "\n".join(settings_lines()) + "\n"]
    (args.out / "dln.md").write_text("\n".join(text))
    print((args.out / "dln.md").read_text())


if __name__ == "__main__":
    main()
