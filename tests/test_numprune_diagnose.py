"""experiments/numprune/diagnose.py on run folders written here: val only, structures removed
per block, conditioning per block, the figure."""

import json

import yaml

from conftest import load_script


def diagnose():
    return load_script("experiments/numprune/diagnose.py", "numprune_diagnose")


def write_run(root, variant, ratio, base_seed, val, heads, channels, setting="llama_tiny",
              metric="ppl"):
    run = root / setting / variant / f"r{ratio}-b{base_seed}"
    (run / ".hydra").mkdir(parents=True)
    dataset = "pycode" if setting == "llama_tiny" else "digit_tokens"
    cfg = {"variant": variant, "dataset": {"name": dataset},
           "model": {"name": setting, "pretrain": {"seed": base_seed},
                     "source": {"num_layers": 2, "hidden_size": 8, "num_heads": 4,
                                "intermediate_size": 10}},
           "method": {"name": "x", "ratio": ratio}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {f"val/{metric}": val, f"test/{metric}": 1e9,     # test must never be read
               **{f"prune/heads_layer{i}": h for i, h in enumerate(heads)},
               **{f"prune/channels_layer{i}": c for i, c in enumerate(channels)},
               **{f"prune/{solve}_{what}/block{i}_{kind}": 10.0 * (i + 1)
                  for solve in ("score", "compensation") for what in ("cond", "min_eig")
                  for i in range(2) for kind in ("attention", "mlp")}}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_diagnosis_reads_val_only_and_counts_removed_structures(tmp_path):
    runs = tmp_path / "runs"
    for base in (0, 1):
        write_run(runs, "numerical_global", 0.5, base, 40.0 + base, [1, 4], [2, 9])
        write_run(runs, "numerical_per_layer", 0.5, base, 30.0 + base, [2, 2], [5, 5])
        write_run(runs, "wanda", 0.5, base, 35.0 + base, [2, 2], [5, 5])
    figure = tmp_path / "structures.png"
    assert diagnose().main(["--runs", str(runs), "--ratios", "0.5", "--base-seeds", "0,1",
                            "--tables", str(tmp_path / "tables"), "--figure", str(figure),
                            "--no-run"]) == 0
    text = (tmp_path / "tables" / "numprune_diagnose.md").read_text()
    assert "1e+09" not in text and "1.000e+09" not in text
    assert "| 50% | - | 40.5 ± 0.71 | - | **30.5 ± 0.71** | 35.5 ± 0.71 |" in text
    # global: block 0 loses 3 heads and 8 channels, block 1 none and 1
    assert "| 50% | numerical global, λ=1 (paper) | 3h 8c / 3h 8c | 0h 1c / 0h 1c |" in text
    assert "| 50% | block 1 mlp | 20 | 20 | 20 | 20 |" in text
    assert figure.stat().st_size > 0


def test_diagnosis_reports_the_settings_asked_for_with_their_own_metric(tmp_path):
    runs = tmp_path / "runs"
    for base in (0, 1):
        write_run(runs, "numerical_global", 0.5, base, 40.0 + base, [1, 4], [2, 9])
        write_run(runs, "numerical_global", 0.5, base, 2.5 + base, [1, 1], [3, 3],
                  setting="ar_image", metric="bpp")
    args = ["--runs", str(runs), "--ratios", "0.5", "--base-seeds", "0,1",
            "--tables", str(tmp_path / "tables"), "--figure", str(tmp_path / "s.png"),
            "--no-run"]
    diagnose().main([*args, "--settings", "llama_tiny"])
    text = (tmp_path / "tables" / "numprune_diagnose.md").read_text()
    assert "ar_image" not in text and "## llama_tiny / pycode: val perplexity" in text
    diagnose().main([*args, "--settings", "ar_image,llama_tiny"])
    text = (tmp_path / "tables" / "numprune_diagnose.md").read_text()
    assert "## ar_image / digit_tokens: val bits per pixel" in text
    assert "| 50% | - | 3 ± 0.71 | - | - | - |" in text
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s_llama_tiny.png").is_file()
