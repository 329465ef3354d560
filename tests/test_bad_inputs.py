"""Every bad input gets one clear line and exit code 2 before any work starts.

Each row of the bad-input table (docs/bad_inputs.md) is a case of :data:`TABLE` (same order): the
command line ``run.py`` gets, the exit code, and the key phrase of the message. The CLI
runs in this process (``run.py``'s own ``main``, as the script calls it), so a case costs
about a second; one case also runs as a real subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, TINY_LLAMA, load_script, run_cli

SMALL_LLAMA = [a for a in TINY_LLAMA if a.startswith("model.")]   # model size only
ROOT = "{root}"          # placeholders filled per case
FILES = "{files}"


def _hf_llama_config(folder: Path, vocab_size: int, hidden: int = 32) -> None:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128
                ).save_pretrained(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The bad files the table names, made once."""
    from transformers import GPT2Config, PreTrainedTokenizerFast

    from compresslab.data.text import EOS, train_bpe

    root = tmp_path_factory.mktemp("bad_files")
    text = "def f(x):\n    return x + 1\n" * 100
    (root / "ok.txt").write_text(text)
    (root / "empty.txt").write_text("")
    (root / "tiny.txt").write_text("x = 1\n")
    (root / "notes.md").write_text(text)
    (root / "unreadable.txt").write_text(text)
    (root / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    (root / "qa_ok.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n' * 4)
    (root / "qa_bad.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n{oops\n')
    (root / "qa_fields.jsonl").write_text('{"prompt": "1+1?"}\n')
    (root / "no_config").mkdir()
    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(root / "gpt2")
    # a LLaMA folder whose tokenizer has more tokens than the model's embedding
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe([text], 300), eos_token=EOS)
    tok.save_pretrained(root / "tok_mismatch")
    _hf_llama_config(root / "tok_mismatch", vocab_size=len(tok) // 2)
    # LLaMA folders with a damaged weights file and with weights of another size
    _hf_llama_config(root / "llama_damaged", vocab_size=64)
    weights = {"model.embed_tokens.weight": torch.zeros(64, 32)}
    save_file(weights, str(root / "llama_damaged" / "model.safetensors"))
    data = (root / "llama_damaged" / "model.safetensors").read_bytes()
    (root / "llama_damaged" / "model.safetensors").write_bytes(data[:-100])
    _hf_llama_config(root / "llama_wrong", vocab_size=64)
    save_file({"model.embed_tokens.weight": torch.zeros(64, 48)},
              str(root / "llama_wrong" / "model.safetensors"))
    # timm ViT weights: damaged, and of another width
    import timm

    kwargs = {"patch_size": 2, "embed_dim": 32, "depth": 1, "num_heads": 2}
    donor = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              in_chans=1, img_size=8, **{**kwargs, "embed_dim": 48})
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    save_file(state, str(root / "vit_wrong.safetensors"))
    data = (root / "vit_wrong.safetensors").read_bytes()
    (root / "vit_damaged.safetensors").write_bytes(data[: len(data) // 2])
    # run folders: finished, interrupted, interrupted with another config, not a run
    for name in ("finished", "interrupted", "other_config", "not_a_run"):
        (root / "runs" / name).mkdir(parents=True)
    (root / "runs" / "finished" / "metrics.json").write_text('{"test/ppl": 1.0}')
    (root / "runs" / "finished" / ".hydra").mkdir()
    (root / "runs" / "finished" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    state_file = {"format": "compresslab-run/1", "config": {"seed": 99}, "wandb_id": None,
                  "attempts": 1}
    for name in ("interrupted", "other_config"):
        (root / "runs" / name / "run_state.json").write_text(json.dumps(state_file))
    return root


VIT = ["model=vit", "dataset=digits", "+model.source.kwargs.patch_size=2",
       "+model.source.kwargs.embed_dim=32", "+model.source.kwargs.depth=1",
       "+model.source.kwargs.num_heads=2"]
TEXT = ["dataset=text_files", *SMALL_LLAMA, "dataset.datamodule.vocab_size=300"]
QA = ["dataset=gsm8k", *SMALL_LLAMA, f"dataset.datamodule.val={FILES}/qa_ok.jsonl",
      f"dataset.datamodule.test={FILES}/qa_ok.jsonl"]


def text_files(train: str) -> list[str]:
    return [*TEXT, f"dataset.train={train}", f"dataset.val={FILES}/ok.txt",
            f"dataset.test={FILES}/ok.txt"]


#: README "Bad input", row by row: (command line, exit code, key phrase of the message)
TABLE = {
    # -- config values ---------------------------------------------------------------------
    "unknown method": (["method=not_a_method"], 1, "Could not find 'method/not_a_method'"),
    "unknown model": (["model=not_a_model"], 1, "Could not find 'model/not_a_model'"),
    "unknown dataset": (["dataset=not_a_dataset"], 1, "Could not find 'dataset/not_a_dataset'"),
    "unknown option": (["method.not_an_option=1"], 1,
                       "Could not override 'method.not_an_option'"),
    "ratio above 1": (["method.ratio=1.5"], 2, "method.ratio must lie strictly between 0 and 1"),
    "ratio of 0": (["method.ratio=0"], 2, "method.ratio must lie strictly between 0 and 1"),
    "negative ratio": (["method.ratio=-0.2"], 2, "method.ratio must lie strictly between 0"),
    "ratio leaves rank 0": (["method.ratio=0.999"], 2, "leaves rank 0 for layer"),
    "rank too large": (["method.rank=1000"], 2, "rank 1000 is larger than layer"),
    "rank below 1": (["method.rank=0"], 2, "rank 0 is below 1 for layer"),
    "no layer selected": (["method.stages.compress.roles=[nothing]"], 2, "no layer matches"),
    "unknown stage option": (["+method.stages.compress.not_an_option=1"], 2,
                             "method.stages.compress: unknown option 'not_an_option'"),
    "calibration samples < 1": (["method=svd_llm", "method.calibration.num_samples=0"], 2,
                                "calibration.num_samples must be at least 1"),
    "spectrum gate": (["method=spectrum", "method.stages.spectrum.gate=step"], 2,
                      "unknown gate 'step'"),
    "pruning samples < 1": (["method=numerical_pruning", "method.num_samples=0"], 2,
                            "num_samples must be at least 1"),
    "pruning allocation": (["method=numerical_pruning", "method.allocation=bogus"], 2,
                           "method.allocation must be per_layer | global, got 'bogus'"),
    "PELA rule": (["method=pela", "method.stages.pretrain.wpr_form=bogus"], 2,
                  "unknown PELA wpr_form 'bogus'"),
    "SoKA init": (["method=soka", "method.stages.adapt.init=bogus"], 2,
                  "init must be kpsvd | zero"),
    "peft option": (["method=lora", "+method.stages.adapt.config.not_an_option=1"], 2,
                    "bad peft config"),
    "DLN alpha": (["model=dln", "dataset=matrix_factorization", "method=dln_compressed",
                   "method.alpha=-1"], 2, "alpha must be positive"),
    "negative stage steps": (["method=pela", "method.stages.finetune.max_steps=-1"], 2,
                             "stage finetune: max_steps must be at least 1"),
    "negative pretrain steps": (["model.pretrain.max_steps=-5"], 2,
                                "model.pretrain.max_steps must be >= 0"),
    "unknown optimizer": (["model.pretrain.optim.name=lion"], 2, "unknown optimizer 'lion'"),
    "batch size 0": (["dataset.datamodule.batch_size=0"], 2,
                     "dataset.datamodule.batch_size must be a positive integer"),
    "unknown eval split": (["eval.splits=[dev]"], 2, "eval.splits: unknown split(s) dev"),
    "GPU trainer without GPU": (["trainer=gpu"], 2, "torch finds no GPU here"),
    "FSDP trainer without GPU": (["trainer=fsdp"], 2, "torch finds no GPU here"),
    "model/dataset mismatch": (["model=vit", "dataset=pycode"], 2,
                               "model=vit (image) cannot run on dataset=pycode (text)"),
    "pair outside the matrix": (["model=dln", "method=pela"], 2,
                                "method=pela does not run on model=dln (family dln); it runs "
                                "on model=llama, model=vit, model=ar_image"),
    "matrix rank too large": (["model=dln", "dataset=matrix_factorization", "method=dln_original",
                               "dataset.datamodule.r=80"], 2, "must be in [1, d/2]"),
    # -- paths -------------------------------------------------------------------------------
    "missing checkpoint": (["model=llama", "model.path=/no/such/ckpt"], 2,
                           "model=llama path does not exist: /no/such/ckpt"),
    "checkpoint without config": (["model=llama", f"model.path={FILES}/no_config"], 2,
                                  "has no config.json"),
    "vit weights missing": ([*VIT, "model.weights=/no/such.safetensors"], 2,
                            "model=vit weights file does not exist"),
    "text_files without paths": (["dataset=text_files"], 2, "needs dataset.train="),
    "missing data file": (text_files("/no/such.txt"), 2, "dataset.train file does not exist"),
    "folder as data file": (text_files(FILES), 2, "dataset.train is not a file"),
    "unreadable data file": (text_files(f"{FILES}/unreadable.txt"), 2,
                             "dataset.train file is not readable"),
    "unsupported file type": (text_files(f"{FILES}/notes.md"), 2,
                              "unsupported file type '.md'"),
    # -- dataset files -----------------------------------------------------------------------
    "empty data file": (text_files(f"{FILES}/empty.txt"), 2, "dataset.train file is empty"),
    "malformed JSONL (text)": (text_files(f"{FILES}/bad.jsonl"), 2,
                               "dataset.train: cannot read"),
    "malformed JSONL (QA)": ([*QA, f"dataset.datamodule.train={FILES}/qa_bad.jsonl"], 2,
                             ":2 is not valid JSON"),
    "JSONL without fields": ([*QA, f"dataset.datamodule.train={FILES}/qa_fields.jsonl"], 2,
                             ":1 lacks question"),
    "split shorter than a block": (text_files(f"{FILES}/tiny.txt"), 2,
                                   "has fewer than block_size"),
    "too few calibration samples": ([*TINY_LLAMA, "method=svd_llm",
                                     "method.calibration.num_samples=100000"], 2,
                                    "asked for 100000 calibration samples"),
    # -- checkpoints and models --------------------------------------------------------------
    "damaged checkpoint weights": (["model=llama", f"model.path={FILES}/llama_damaged"], 2,
                                   "cannot read weights file"),
    "checkpoint weights of another size": (["model=llama", f"model.path={FILES}/llama_wrong"],
                                           2, "do not match"),
    "damaged vit weights": ([*VIT, f"model.weights={FILES}/vit_damaged.safetensors"], 2,
                            "cannot read weights file"),
    "vit weights of another model": ([*VIT, f"model.weights={FILES}/vit_wrong.safetensors"], 2,
                                     "does not fit timm model"),
    "unknown architecture": (["model=llama", f"model.path={FILES}/gpt2"], 2,
                             "no architecture adapter for GPT2LMHeadModel"),
    "tokenizer mismatch": (["model=llama", f"model.path={FILES}/tok_mismatch", *TEXT[:1],
                            f"dataset.train={FILES}/ok.txt", f"dataset.val={FILES}/ok.txt",
                            f"dataset.test={FILES}/ok.txt", "dataset.datamodule.block_size=16"],
                           2, "tokenizer mismatch"),
    # -- run folders and resume --------------------------------------------------------------
    "run folder with results": ([f"hydra.run.dir={FILES}/runs/finished"], 2,
                                "already holds results; refusing to overwrite"),
    "run folder of an interrupted run": ([f"hydra.run.dir={FILES}/runs/interrupted"], 2,
                                         "holds an interrupted run; continue it with resume="),
    "resume a missing folder": (["resume=/no/such/run"], 2, "no such run folder"),
    "resume a finished run": ([f"resume={FILES}/runs/finished"], 2, "the run already finished"),
    "resume a folder that is no run": ([f"resume={FILES}/runs/not_a_run"], 2,
                                       "not a run folder"),
    "resume with -m": (["-m", f"resume={FILES}/runs/interrupted"], 2,
                       "cannot be combined with -m"),
    "resume with another config": ([f"resume={FILES}/runs/other_config", "seed=3"], 2,
                                   "the config differs from the run's"),
}


@pytest.fixture(scope="module")
def run_py():
    """``run.py`` as a module; its Hydra main finds ``configs/`` next to it."""
    module = load_script("run.py", "compresslab_run_script")
    module.main.__wrapped__.__module__ = "__main__"   # Hydra: config path beside run.py
    return module


def cli(run_py, args: list[str]) -> tuple[int, str]:
    """``python run.py ARGS`` in this process: (exit code, stderr)."""
    saved_argv, err = sys.argv, io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            sys.argv = ["run.py", *run_py.command_line(args)]
            run_py.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved_argv
    return code, err.getvalue()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (but Hydra's log) -> content hash."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.log"}


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input_table(case, run_py, files, shared_root, tmp_path, monkeypatch):
    args, code, phrase = TABLE[case]
    if case in ("GPU trainer without GPU", "FSDP trainer without GPU") \
            and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if case == "unreadable data file":  # (root reads any file: pretend the mode says no)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).endswith(
            "unreadable.txt") else real_access(p, mode, **kw))
    args = [a.replace(FILES, str(files)) for a in args]
    existing = {a.split("=", 1)[1] for a in args if a.startswith(("hydra.run.dir=", "resume="))}
    run_dir = Path(next(iter(existing))) if existing else tmp_path / "run"
    before = snapshot(run_dir) if run_dir.is_dir() else {}
    extra = [f"paths.root={tmp_path}", f"paths.cache={shared_root}/cache", "logger=none",
             "progress=false"]
    if not existing:
        extra.append(f"hydra.run.dir={run_dir}")
    got, stderr = cli(run_py, [*args, *extra])
    assert got == code, stderr[-3000:]
    if code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
        assert phrase in lines[0], lines[0]
    else:  # Hydra's own errors: the message and the available options
        assert phrase in stderr, stderr[-3000:]
    # nothing was built or written: no base model, no results, an existing folder untouched
    assert not (tmp_path / "base").exists()
    if before:
        assert snapshot(run_dir) == before
    elif run_dir.exists():
        assert {p.name for p in run_dir.iterdir()} <= {".hydra", "run.log"}


def test_table_matches_readme():
    """Every row of the table in docs/bad_inputs.md has a case here and every case a row."""
    readme = (REPO / "docs" / "bad_inputs.md").read_text()
    section = readme.split("# Bad input", 1)[1].split("\n## ", 1)[0]
    table = section[section.index("| input |"):].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == len(TABLE), (len(rows), len(TABLE))
    for row, (_, _, phrase) in zip(rows, TABLE.values()):
        cell = row.replace("`", "").replace("\\|", "|")
        assert phrase.split("'")[0].split(" (")[0][:20] in cell, (row, phrase)


def test_cli_subprocess_exit_code_and_one_line(tmp_path):
    """The real script, as a user runs it."""
    result = run_cli(["method.ratio=1.5", f"paths.root={tmp_path}", "logger=none",
                      f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: method.ratio must lie strictly between 0 and 1, got 1.5"]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_run_into_a_finished_folder_keeps_it(tmp_path):
    """A finished run's folder, its saved config included, survives any later command
    pointed at it (Hydra would rewrite ``.hydra/`` before the pipeline could refuse)."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.json").write_text('{"test/ppl": 1.0}')
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    before = snapshot(run_dir)
    result = run_cli(["method.ratio=0.5", f"paths.root={tmp_path}", "logger=none",
                      f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2 and "already holds results" in result.stderr
    assert snapshot(run_dir) == before
