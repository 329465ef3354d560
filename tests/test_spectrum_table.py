"""The spectrum table script on run folders written here: val beside test, the parameter
budget of every row, the calibration inputs of every row."""

import json
import subprocess
import sys

import yaml

from conftest import REPO, load_script


def write_run(root, method, ratio, metrics, inputs=None):
    run = root / f"{method}-{ratio}"
    (run / ".hydra").mkdir(parents=True)
    cfg = {"model": {"name": "llama_tiny", "source": {"hidden_size": 64, "num_layers": 2}},
           "dataset": {"name": "pycode"}, "method": {"name": method, "ratio": ratio}}
    if inputs:
        cfg["method"]["calibration"] = {"inputs": inputs}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_table_shows_val_budget_and_calibration_inputs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "none", None, {"test/ppl": 10.0, "val/ppl": 9.0})
    write_run(runs, "svd", 0.4, {"test/ppl": 30.0, "val/ppl": 29.0,
                                 "compress/params_ratio": 0.41, "compress/params_kept": 1200})
    write_run(runs, "svd_llm", 0.4, {"test/ppl": 20.0, "val/ppl": 19.0,
                                     "compress/params_ratio": 0.41,
                                     "compress/params_kept": 1200}, inputs="dense")
    write_run(runs, "spectrum", 0.4, {"test/ppl": 18.0, "val/ppl": 17.5,
                                      "spectrum/params_ratio": 0.415,
                                      "spectrum/params_kept": 1190}, inputs="compressed")
    result = subprocess.run([sys.executable, str(REPO / "experiments/spectrum/table.py"),
                             "--runs", str(runs), "--tables", str(tmp_path / "tables")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    text = (tmp_path / "tables" / "spectrum.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 0.4 |")]
    assert rows == ["| 0.4 | 10 | 30 | 20 | 18 |",          # test
                    "| 0.4 | 9 | 29 | 19 | 17.5 |",         # val
                    "| 0.4 | 0.41 | 0.41 | 0.415 |",        # achieved ratio
                    "| 0.4 | 1200 | 1200 | 1190 |"], rows  # parameters kept
    assert "svd -, svd_llm dense, spectrum compressed" in text
    # the order check says which way spectrum differs (no asvd/svd_llm_ft rows: incomplete)
    assert "- ratio 0.4: incomplete" in text


def test_val_checks_table_lists_val_beside_test(tmp_path):
    val_checks = load_script("experiments/spectrum/val_checks.py", "spectrum_val_checks")
    for variant, ratio, val, test in (("svd_llm-dense", 0.8, 2.0, 3.0),
                                      ("spectrum-soft", 0.6, 1.5, 1.25)):
        run = tmp_path / f"{variant}-r{ratio}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"variant": variant, "method": {"ratio": ratio}}))
        (run / "metrics.json").write_text(json.dumps({"val/ppl": val, "test/ppl": test}))
    rows = [line for line in val_checks.table(tmp_path).splitlines()
            if line.startswith("| ") and "variant" not in line]
    assert rows == ["| spectrum, search_forward soft | 0.6 | 1.5 | 1.25 |",
                    "| svd_llm, inputs dense | 0.8 | 2 | 3 |"]
    # finished runs are not run again (re-running resumes a sweep)
    val_checks.run_all(tmp_path / "none", [], [])
    assert len(val_checks.VARIANTS) == 4


def test_order_check_words_the_direction():
    table = load_script("experiments/spectrum/table.py", "spectrum_table")
    ppl = {("svd", 0.4): 30.0, ("asvd", 0.4): 25.0, ("svd_llm", 0.4): 20.0,
           ("svd_llm_ft", 0.4): 16.0, ("spectrum", 0.4): 18.0}
    assert table.order_checks(ppl, [0.4]) == [
        "- ratio 0.4: svd_llm < asvd < svd: yes; spectrum <= svd_llm: yes (spectrum's ppl "
        "10.0% below svd_llm's); 12.5% above svd_llm_ft's"]
