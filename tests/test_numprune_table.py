"""The numerical pruning table script on run folders written here: mean ± std over base
models, the bold rule per ratio, and a latency column that shows only paired speed-ups."""

import json

import yaml

from conftest import load_script


def script(name: str):
    return load_script(f"experiments/numprune/{name}.py", f"numprune_{name}")


table = script("table")


def write_run(root, variant, ratio, base_seed, metrics):
    run = root / variant / f"r{ratio}-b{base_seed}"
    (run / ".hydra").mkdir(parents=True)
    cfg = {"variant": variant, "dataset": {"name": "pycode"},
           "model": {"name": "llama_tiny", "pretrain": {"seed": base_seed},
                     "source": {"num_layers": 4, "hidden_size": 128}},
           "method": {"name": "x", "ratio": ratio}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(json.dumps(metrics))


def render(tmp_path):
    text = table.render(tmp_path / "runs", tmp_path / "tables")
    assert text == (tmp_path / "tables" / "numprune.md").read_text()
    return text


def test_bold_only_where_the_lead_holds_on_every_base_model(tmp_path):
    runs = tmp_path / "runs"
    # at 30% numerical leads wanda on all three base models; at 50% it loses on base model 2
    for base, (num30, wanda30, num50, wanda50) in enumerate([(20.0, 25.0, 40.0, 50.0),
                                                             (21.0, 27.0, 41.0, 52.0),
                                                             (22.0, 28.0, 60.0, 45.0)]):
        write_run(runs, "dense", None, base, {"test/ppl": 10.0 + base, "val/ppl": 10.0})
        for variant, ratio, ppl in (("numerical_global", 0.3, num30), ("wanda", 0.3, wanda30),
                                    ("numerical_global", 0.5, num50), ("wanda", 0.5, wanda50)):
            write_run(runs, variant, ratio, base, {"test/ppl": ppl, "val/ppl": ppl,
                                                   "prune/params_ratio": ratio})
    text = render(tmp_path)
    assert "| 30% | 11 ± 1 | **21 ± 1** | 26.67 ± 1.5 |" in text
    assert "| 50% | 11 ± 1 | 47 ± 11 | 49 ± 3.6 |" in text
    assert ("- 30%: **numerical (global, the paper's)** bold (numerical_global vs wanda: "
            "better on 3/3") in text
    assert ("- 30%, numerical (global, the paper's) against the baselines only: **numerical "
            "(global, the paper's)** bold") in text
    assert "- 50%: no bold cell (numerical_global vs wanda: better on 2/3" in text


def test_latency_column_shows_only_paired_speedups(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "wanda", 0.3, 0, {"test/ppl": 30.0, "prune/speedup": 1.25,
                                      "prune/cpu_speedup": 1.5, "prune/latency_ms": 4.0,
                                      "prune/latency_dense_ms": 5.0})
    write_run(runs, "wanda", 0.3, 1, {"test/ppl": 32.0, "prune/speedup": 1.35,
                                      "prune/cpu_speedup": 1.5})
    write_run(runs, "flap", 0.3, 0, {"test/ppl": 35.0})          # latency not measured
    text = render(tmp_path)
    assert "latency speed-up (paired)" in text and "latency ms" not in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith(("| wanda-sp |", "| FLAP |"))}
    assert rows["wanda-sp"].endswith("| 1.3 ± 0.071 | 1.5 ± 0 | - |")
    assert rows["FLAP"].endswith("| - | - | - |")
