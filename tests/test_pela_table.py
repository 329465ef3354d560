"""The PELA table script and sweep commands, on run folders written here."""

import json
import subprocess
import sys

import yaml

from conftest import REPO


def write_run(root, name, row, ratio, seed, acc, params, times, extra=None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"row": row, "seed": seed, "model": {"name": "vit_tiny"},
           "dataset": {"name": "digits"}, "method": {"name": "pela", "ratio": ratio}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"test/acc": acc, "params/compressed": params,
               **{f"{stage}/time_s": t for stage, t in times.items()}, **(extra or {})}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_table_aggregates_rows_over_seeds(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "d0", "dense", 0.5, 0, 0.96, 1000, {"finetune": 2.0})
    write_run(runs, "d1", "dense", 0.5, 1, 0.98, 1000, {"finetune": 4.0})
    write_run(runs, "a0", "lra", 0.5, 0, 0.50, 600, {"decompose": 1.0, "finetune": 2.0},
              {"val/acc": 0.55})
    write_run(runs, "b0", "lra_fd_wpr", 0.5, 0, 0.90, 600,
              {"decompose": 1.0, "pretrain": 5.0, "finetune": 2.0},
              {"after_decompose/test_acc": 0.2, "after_pretrain/test_acc": 0.8})
    write_run(runs, "c0", "lra", 0.7, 0, 0.30, 400, {"decompose": 1.0, "finetune": 2.0})
    result = subprocess.run([sys.executable, str(REPO / "experiments/pela/table.py"),
                             "--runs", str(runs), "--tables", str(tmp_path / "tables")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    text = (tmp_path / "tables" / "pela.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| vit_tiny")]
    assert lines == [
        "| vit_tiny / digits | 0.5 | dense | 2 | 1,000 | - | 0.97 ± 0.014 | 3 ± 1.4 | - | - |",
        "| vit_tiny / digits | 0.5 | LRA | 1 | 600 | 0.55 | 0.5 | 3 | - | - |",
        "| vit_tiny / digits | 0.5 | LRA + FD + WPR | 1 | 600 | - | 0.9 | 8 | 0.2 | 0.8 |",
        "| vit_tiny / digits | 0.7 | dense | 2 | 1,000 | - | 0.97 ± 0.014 | 3 ± 1.4 | - | - |",
        "| vit_tiny / digits | 0.7 | LRA | 1 | 400 | - | 0.3 | 3 | - | - |",
    ]
    assert (tmp_path / "tables" / "pela.png").stat().st_size > 0


def test_sweep_builds_one_multirun_per_row():
    sys.path.insert(0, str(REPO / "experiments" / "pela"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    cmds = sweep.commands(REPO / "out", ["x=1"], ["vit_tiny"], None, None, list(sweep.ROWS))
    assert len(cmds) == len(sweep.ROWS)
    dense, lra = cmds[0], cmds[1]
    assert "method.ratio=0.3" in dense and "seed=0,1,2" in dense and "row=dense" in dense
    assert "method.ratio=0.3,0.5,0.7,0.9" in lra and "method.stages.pretrain=null" in lra
    assert all("x=1" in c and "experiment=pela" in c and "group=pela" in c for c in cmds)
    # extra overrides come before a row's, so that a row can switch a stage off after them
    assert dense.index("x=1") < dense.index("method.stages.pretrain=null")
