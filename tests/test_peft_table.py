"""The PEFT table script (experiments/peft/table.py) on run folders written here."""

import json
import subprocess
import sys

import yaml

from conftest import REPO


def write_run(root, row, seed, acc, params, smoothed, target=0.75, roles=("q", "v")):
    run = root / row / f"s{seed}"
    (run / ".hydra").mkdir(parents=True)
    cfg = {"row": row, "seed": seed,
           "model": {"name": "llama_tiny", "source": {"num_layers": 4, "hidden_size": 128}},
           "dataset": {"name": "arithmetic", "datamodule": {
               "num_train": 4000, "num_test": 400, "min_steps": 1, "max_steps": 1,
               "max_value": 9}},
           "method": {"name": row.split("_")[0], "stages": {
               "adapt": {"roles": list(roles) if roles else None},
               "finetune": {"max_steps": len(smoothed), "target_loss": target,
                            "optim": {"lr": 0.01}}}}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    hit = next((i + 1 for i, v in enumerate(smoothed) if v <= target), None)
    metrics = {"trainable/params": params, "test/exact_match": acc,
               "finetune/target_reached": int(hit is not None),
               "finetune/grad_norm_var": 0.01, "finetune/grad_norm_mean": 0.5,
               **({"finetune/steps_to_target": hit} if hit else {})}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "finetune_loss_curve.json").write_text(json.dumps(
        {"loss": smoothed, "smoothed": smoothed, "grad_norm": [], "target_loss": target}))


def table(runs, tables, *extra):
    result = subprocess.run([sys.executable, str(REPO / "experiments/peft/table.py"),
                             "--runs", str(runs), "--tables", str(tables), *extra],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return (tables / "peft.md").read_text()


def test_table_rows_note_curves_and_retarget(tmp_path):
    runs, tables = tmp_path / "runs", tmp_path / "tables"
    fast = [1.0 - 0.01 * i for i in range(100)]        # <= 0.75 from step 26
    slow = [1.0 - 0.002 * i for i in range(100)]       # never <= 0.75
    write_run(runs, "soka_tau0.5", 0, 0.40, 750, fast)
    write_run(runs, "soka_tau0.5", 1, 0.30, 750, fast)
    write_run(runs, "lora_r4", 0, 0.35, 1000, slow)
    text = table(runs, tables)
    assert "1 operation(s) on numbers up to 9; 4000 train / 400 test problems" in text
    assert "adapters on ['q', 'v'] fine-tuned 100 steps" in text
    lines = [line for line in text.splitlines() if line.startswith("| ") and "row" not in line]
    assert lines == [
        "| lora_r4 | 1 | 1000 | - | 0.35 | - | 0/1 | 0.01 | 0.5 |",
        "| soka_tau0.5 | 2 | 750 | - | 0.35 ± 0.071 | 26 | 2/2 | 0.01 | 0.5 |",
    ]
    assert (tables / "peft_loss.png").stat().st_size > 0
    text = table(runs, tables, "--target", "0.85")    # from the saved curves
    assert "| lora_r4 | 1 | 1000 | - | 0.35 | 76 | 1/1 |" in text
    assert "| soka_tau0.5 | 2 | 750 | - | 0.35 ± 0.071 | 16 | 2/2 |" in text


def test_table_names_every_linear_when_roles_is_null(tmp_path):
    runs, tables = tmp_path / "runs", tmp_path / "tables"
    write_run(runs, "lora_r4", 0, 0.35, 1000, [1.0, 0.5], roles=None)
    assert "adapters on every attention and MLP linear fine-tuned 2 steps" in table(runs, tables)
