"""The PELA table script and sweep commands, on run folders written here."""

import json
import subprocess
import sys

import yaml

from conftest import REPO


def write_run(root, name, row, ratio, seed, acc, params, times, extra=None, base_seed=0):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"row": row, "seed": seed, "model": {"name": "vit_tiny", "pretrain": {"seed": base_seed}},
           "dataset": {"name": "digits"}, "method": {"name": "pela", "ratio": ratio}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"test/acc": acc, "params/compressed": params,
               **{f"{stage}/time_s": t for stage, t in times.items()}, **(extra or {})}
    (run / "metrics.json").write_text(json.dumps(metrics))


def table(runs, tables):
    result = subprocess.run([sys.executable, str(REPO / "experiments/pela/table.py"),
                             "--runs", str(runs), "--tables", str(tables)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return (tables / "pela.md").read_text()


def test_table_aggregates_rows_over_base_models(tmp_path):
    runs = tmp_path / "runs"
    # dense: two base models (0.96; 0.98 and 0.97 averaged first: 0.975)
    write_run(runs, "d0", "dense", 0.5, 0, 0.96, 1000, {"finetune": 2.0})
    write_run(runs, "d1", "dense", 0.5, 0, 0.98, 1000, {"finetune": 4.0}, base_seed=1)
    write_run(runs, "d2", "dense", 0.5, 1, 0.97, 1000, {"finetune": 3.0}, base_seed=1)
    write_run(runs, "a0", "lra", 0.5, 0, 0.50, 600, {"decompose": 1.0, "finetune": 2.0},
              {"val/acc": 0.55})
    write_run(runs, "b0", "lra_fd_wpr", 0.5, 0, 0.90, 600,
              {"decompose": 1.0, "pretrain": 5.0, "finetune": 2.0},
              {"after_decompose/val_acc": 0.25, "after_decompose/test_acc": 0.2,
               "after_pretrain/test_acc": 0.8})
    write_run(runs, "c0", "lra", 0.7, 0, 0.30, 400, {"decompose": 1.0, "finetune": 2.0})
    text = table(runs, tmp_path / "tables")
    lines = [line for line in text.splitlines() if line.startswith("| vit_tiny")]
    dense = "| dense | 3 | 2 | 1,000 | - | 0.9675 ± 0.011 | 3 ± 1 | - | - | - |"
    assert lines == [
        f"| vit_tiny / digits | 0.5 {dense}",
        "| vit_tiny / digits | 0.5 | LRA | 1 | 1 | 600 | 0.55 | 0.5 | 3 | - | - | - |",
        "| vit_tiny / digits | 0.5 | LRA + FD + WPR | 1 | 1 | 600 | - | 0.9 | 8 | 0.25 | 0.2 "
        "| 0.8 |",
        f"| vit_tiny / digits | 0.7 {dense}",
        "| vit_tiny / digits | 0.7 | LRA | 1 | 1 | 400 | - | 0.3 | 3 | - | - | - |",
    ]
    # one base model: never bold
    assert "**" not in "\n".join(lines)
    assert "- vit_tiny at ratio 0.5: no bold cell (lra_fd_wpr vs lra: 1 shared base model(s))" \
        in text
    assert (tmp_path / "tables" / "pela.png").stat().st_size > 0


def test_a_lead_on_every_base_model_is_bold(tmp_path):
    runs = tmp_path / "runs"
    for base, (lra, full) in enumerate([(0.50, 0.90), (0.55, 0.91), (0.52, 0.93)]):
        write_run(runs, f"a{base}", "lra", 0.5, 0, lra, 600, {}, base_seed=base)
        write_run(runs, f"b{base}", "lra_fd_wpr", 0.5, 0, full, 600, {}, base_seed=base)
    text = table(runs, tmp_path / "tables")
    assert "| LRA + FD + WPR | 3 | 3 | 600 | - | **0.9133 ± 0.015** |" in text
    assert "- vit_tiny at ratio 0.5: **LRA + FD + WPR** bold (lra_fd_wpr vs lra: better on " \
           "3/3 base models" in text
