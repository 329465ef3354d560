"""Every bad input gets one clear line and a non-zero exit before any work starts.

Each row of the README's bad-input table has a case here.
"""

import pytest

from compresslab.errors import ConfigError
from compresslab.pipeline import run
from conftest import TINY_LLAMA, compose_cfg, run_cli

CLI_CASES = {
    "ratio above 1": (["method.ratio=1.5"], "method.ratio must lie strictly between 0 and 1"),
    "ratio of 0": (["method.ratio=0"], "method.ratio must lie strictly between 0 and 1"),
    "rank too large": (["method.rank=1000"], "rank 1000 is larger than layer"),
    "missing checkpoint": (["model=llama", "model.path=/no/such/ckpt"],
                           "model=llama path does not exist: /no/such/ckpt"),
    "model/dataset mismatch": (["model=vit_tiny", "dataset=pycode"],
                               "model=vit_tiny (image) cannot run on dataset=pycode (text)"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_value_gets_one_line_and_exit_2(case, tmp_path):
    args, message = CLI_CASES[case]
    result = run_cli([*args, f"paths.root={tmp_path}", "logger=none",
                      f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {lines[0][7:]}"] and message in lines[0], result.stderr
    # nothing was built: no base model, no token cache, no metrics
    assert not (tmp_path / "base").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unknown_choice_lists_the_options(tmp_path):
    result = run_cli(["method=not_a_method", f"paths.root={tmp_path}"])
    assert result.returncode != 0
    assert "Could not find 'method/not_a_method'" in result.stderr
    assert "Available options" in result.stderr and "svd" in result.stderr


IN_PROCESS_CASES = {
    "text_files without paths": (["dataset=text_files"], "needs dataset.train="),
    "text_files bad suffix": (["dataset=text_files", "dataset.train=README.md",
                               "dataset.val=README.md", "dataset.test=README.md"],
                              "unsupported file type '.md'"),
    "vit without weights": (["model=vit", "dataset=digits"], "needs a local weights file"),
    "ratio leaves rank 0": (["method.ratio=0.999"], "leaves rank 0"),
    "no layer selected": (["method.stages.compress.roles=[nothing]"], "no layer matches"),
    "unknown optimizer": (["model.pretrain.optim.name=lion"], None),
    "checkpoint folder without config": (["model=llama", "model.path=."], "has no config.json"),
    "matrix rank too large": (["model=dln", "dataset=matrix_factorization", "method=none",
                               "dataset.datamodule.r=80"], "must be in [1, d/2]"),
}


@pytest.mark.parametrize("case", list(IN_PROCESS_CASES))
def test_bad_setting_raises_config_error_before_work(case, tmp_path):
    args, message = IN_PROCESS_CASES[case]
    cfg = compose_cfg([*TINY_LLAMA[:1], *args], tmp_path)
    if message is None:  # errors raised while building a stage: still before any work
        with pytest.raises(ConfigError):
            run(compose_cfg([*TINY_LLAMA, *args, "method=none"], tmp_path))
        assert not (tmp_path / "base").exists()
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        run(cfg)
    assert not (tmp_path / "base").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_existing_results_are_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"test/ppl": 1.0}')
    with pytest.raises(ConfigError, match="already holds results"):
        run(compose_cfg(TINY_LLAMA, tmp_path, run_dir))
    assert (run_dir / "metrics.json").read_text() == '{"test/ppl": 1.0}'
