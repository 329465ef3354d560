"""Zero-shot evaluation through lm-eval: the embedded task, lm-eval's accuracy against a
log-likelihood computed here, the run's metrics, and local-data-only checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compresslab.errors import ConfigError
from compresslab.metrics import zero_shot
from compresslab.pipeline import run
from conftest import TINY_LLAMA, compose_cfg, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return zero_shot.embedded_task(tmp_path_factory.mktemp("cache"))


def items(task_file: Path) -> list[dict]:
    data = Path(json.loads(task_file.read_text())["dataset_kwargs"]["data_files"]["test"])
    return [json.loads(line) for line in data.read_text().splitlines()]


def test_embedded_task_items_are_true_continuations(task_file):
    rows = items(task_file)
    assert len(rows) == zero_shot.NEXT_LINE_ITEMS
    test_texts = [p.read_text(encoding="utf-8", errors="replace")
                  for p in zero_shot.test_split_files()]
    for row in rows[:40]:
        choices = row["choices"]
        assert len(choices) == zero_shot.NEXT_LINE_CHOICES == len(set(choices))
        assert row["context"].endswith("\n")
        true = row["context"] + choices[row["label"]] + "\n"
        assert any(true in text for text in test_texts)
        length = len(choices[row["label"]])
        assert all(abs(len(c) - length) <= max(3, length // 10) for c in choices)
    shortest = sum(min(range(len(r["choices"])), key=lambda i: len(r["choices"][i]))
                   == r["label"] for r in rows)
    assert shortest < 0.4 * len(rows)   # "pick the shortest line" is no strategy
    labels = {row["label"] for row in rows}
    assert labels == set(range(zero_shot.NEXT_LINE_CHOICES))   # the answer's place varies
    # generated once: a second call reuses the folder
    stamp = task_file.stat().st_mtime_ns
    assert zero_shot.embedded_task(task_file.parents[3]) == task_file
    assert task_file.stat().st_mtime_ns == stamp


def own_accuracy(model, tokenizer, rows) -> float:
    """Accuracy of the most likely choice, each scored by the summed log-probability of its
    tokens after the context (lm-eval's split: the context's tokens are those of the
    context alone, the continuation the rest of the joint encoding)."""
    correct = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            whole = tokenizer.encode(row["context"] + choice).ids
            context = tokenizer.encode(row["context"]).ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item()
                              for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return correct / len(rows)


def test_lm_eval_accuracy_matches_own_log_likelihoods(task_file, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from compresslab.data.pycode import PyCodeDataModule

    data = PyCodeDataModule(max_files=30, vocab_size=512, cache_dir=str(tmp_path))
    data.load()
    tokenizer = data.shared_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=512)).eval()
    limit = 24
    results = zero_shot.run_tasks(model, tokenizer, [task_file], limit=limit)
    acc = results[zero_shot.NEXT_LINE_TASK]["acc,none"]
    assert acc == pytest.approx(own_accuracy(model, tokenizer, items(task_file)[:limit]))


def test_run_logs_lm_eval_metrics_dense_and_final(shared_root, tmp_path):
    cfg = compose_cfg([*TINY_LLAMA, "method=svd", "method.ratio=0.4", "save_model=false",
                       "eval.lm_eval.tasks=[pycode_next_line]", "eval.lm_eval.limit=8"],
                      shared_root, tmp_path / "run")
    run(cfg)
    metrics = read_metrics(tmp_path / "run")
    for prefix in ("", "dense/"):
        acc = metrics[f"{prefix}lm_eval/pycode_next_line/acc"]
        assert 0.0 <= acc <= 1.0 and (acc * 8) == int(acc * 8)   # k of 8 items right
        assert f"{prefix}lm_eval/pycode_next_line/acc_norm" in metrics


def write_task(folder: Path, dataset_path: str, data_file: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["task: my_local_task", f"dataset_path: {dataset_path}",
             "output_type: multiple_choice", "doc_to_text: !function utils.doc_to_text"]
    if data_file:
        lines += ["dataset_kwargs:", "  data_files:", f"    test: {data_file}"]
    path = folder / "task.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case,message", [
    ("hub", "reads dataset_path 'piqa', which is not a local"),
    ("missing_file", "does not exist: "),
    ("unknown", "is neither an embedded task"),
])
def test_non_local_tasks_refused_before_work(case, message, shared_root, tmp_path):
    if case == "hub":
        task = write_task(tmp_path / "t", "piqa", None)
    elif case == "missing_file":
        task = write_task(tmp_path / "t", "json", str(tmp_path / "nowhere.jsonl"))
    else:
        task = "piqa"
    cfg = compose_cfg([*TINY_LLAMA, "method=svd", f"eval.lm_eval.tasks=[{task}]"],
                      shared_root, tmp_path / "run")
    with pytest.raises(ConfigError, match=message) as err:
        run(cfg)
    assert "\n" not in str(err.value)
    if case == "missing_file":
        assert str(tmp_path / "nowhere.jsonl") in str(err.value)
    assert not (tmp_path / "run").exists()   # nothing written


def test_local_task_yaml_with_existing_file_passes_check(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    assert zero_shot.check_task_file(write_task(tmp_path / "t", "json", str(data))) \
        == "my_local_task"


def test_image_model_refused(shared_root, tmp_path):
    cfg = compose_cfg(["model=vit_tiny", "dataset=digits", "method=svd",
                       "eval.lm_eval.tasks=[pycode_next_line]"], shared_root, tmp_path / "r")
    with pytest.raises(ConfigError, match="need a language model"):
        run(cfg)


def test_flatten_names():
    out = zero_shot.flatten({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                   "exact_match,strict": 1}}, "dense/")
    assert out == {"dense/lm_eval/t/acc": 0.5, "dense/lm_eval/t/exact_match_strict": 1.0}
