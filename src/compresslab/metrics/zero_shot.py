"""Zero-shot evaluation of language models through lm-evaluation-harness (``lm_eval``).

``eval.lm_eval.tasks=[...]`` runs :func:`lm_eval.simple_evaluate` on the model in memory
(``HFLM`` with the run's own tokenizer) after the dense evaluation and after the last
stage; results land as ``lm_eval/<task>/<metric>`` (``dense/lm_eval/...`` for the dense
model). Task data must be local: a task is either

- an embedded task of this project (:data:`EMBEDDED`), whose data is generated from local
  files into the cache on first use, or
- the path of an lm-eval task YAML whose ``dataset_path`` is a packaged file builder
  (json, csv, parquet, text, arrow) with local ``dataset_kwargs.data_files``, or a local
  folder.

Anything else (a hub dataset such as lm-eval's own ``piqa``) is refused with a one-line
:class:`ConfigError` before any work; the evaluation also runs with the HF hub switched
off, so that nothing can be downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from compresslab.errors import ConfigError

FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
NEXT_LINE_TASK = "pycode_next_line"
NEXT_LINE_VERSION = 2       # 2: distractors of the true line's length
NEXT_LINE_CHOICES = 4       # the true line and three distractors
NEXT_LINE_CONTEXT = 4       # lines of code before the one to pick
NEXT_LINE_ITEMS = 200


def settings(cfg) -> dict[str, Any]:
    """``cfg.eval.lm_eval`` as a plain dict (defaults when absent)."""
    from omegaconf import OmegaConf

    node = (cfg.get("eval") or {}).get("lm_eval") or {}
    if not isinstance(node, dict):
        node = OmegaConf.to_container(node, resolve=True)
    return {"tasks": list(node.get("tasks") or []), "limit": node.get("limit"),
            "batch_size": int(node.get("batch_size") or 8),
            "num_fewshot": node.get("num_fewshot")}


# -- the embedded task: the true next line of stdlib code among distractors -------------------

def _candidate_lines(text: str) -> list[int]:
    """Indices of lines worth predicting: code of 16..80 characters, not comments, with
    enough lines before them for the context."""
    lines = text.splitlines()
    return [i for i, line in enumerate(lines) if i >= NEXT_LINE_CONTEXT
            and 16 <= len(line.strip()) <= 80 and not line.strip().startswith(("#", '"', "'"))]


def next_line_items(files: list[Path], count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` multiple-choice items: ``context`` (the lines before, ending in a newline),
    ``choices`` (the true next line and distractor lines of about its length from other
    places, all distinct) and ``label`` (the index of the true line)."""
    rng = random.Random(seed)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    places = [(f, i) for f, text in enumerate(texts) for i in _candidate_lines(text)]
    if len(places) < count + NEXT_LINE_CHOICES:
        raise ConfigError(f"lm_eval task {NEXT_LINE_TASK}: only {len(places)} usable lines "
                          f"in {len(files)} files")
    lines = [t.splitlines() for t in texts]
    by_length: dict[int, list[str]] = {}
    for f, i in places:
        by_length.setdefault(len(lines[f][i]), []).append(lines[f][i])
    items = []
    for f, i in rng.sample(places, count):
        true = lines[f][i]
        # distractors of about the true line's length: a summed log-likelihood favours
        # short lines, and the answer must not be "the shortest one"
        width = max(3, len(true) // 10)
        pool = sorted({line for n in range(len(true) - width, len(true) + width + 1)
                       for line in by_length.get(n, []) if line.strip() != true.strip()})
        distractors = rng.sample(pool, NEXT_LINE_CHOICES - 1)
        label = rng.randrange(NEXT_LINE_CHOICES)
        choices = distractors[:label] + [true] + distractors[label:]
        context = "\n".join(lines[f][i - NEXT_LINE_CONTEXT:i]) + "\n"
        items.append({"context": context, "choices": choices, "label": label})
    return items


def test_split_files(root: str | None = None) -> list[Path]:
    """The stdlib files of ``dataset=pycode``'s test split (its default percentages)."""
    from compresslab.data.pycode import split_of, stdlib_files

    base = Path(root or sysconfig.get_paths()["stdlib"])
    return [p for p in stdlib_files(str(base))
            if split_of(str(p.relative_to(base)), 5, 5) == "test"]


def task_yaml(name: str, data_file: Path) -> str:
    """An lm-eval multiple-choice task reading ``data_file`` (JSON lines) as its test split:
    the log-likelihood of each choice after the context, accuracy of the most likely."""
    return json.dumps({
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean",
                         "higher_is_better": True}],
        "metadata": {"version": NEXT_LINE_VERSION}}, indent=1)   # JSON is valid YAML


def embedded_task(cache: Path, items: int = NEXT_LINE_ITEMS) -> Path:
    """The folder of the embedded task (YAML + data), generated once into ``cache``."""
    import platform

    key = hashlib.sha1(f"{NEXT_LINE_VERSION}:{platform.python_version()}:{items}".encode()
                       ).hexdigest()[:12]
    folder = Path(cache) / "lm_eval" / NEXT_LINE_TASK / key
    yaml_file = folder / f"{NEXT_LINE_TASK}.yaml"
    if not yaml_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "test.jsonl"
        rows = next_line_items(test_split_files(), items)
        tmp = data.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(data)
        yaml_file.with_suffix(".tmp").write_text(task_yaml(NEXT_LINE_TASK, data))
        yaml_file.with_suffix(".tmp").replace(yaml_file)
    return yaml_file


EMBEDDED = {NEXT_LINE_TASK: embedded_task}


# -- user task YAMLs: local data only ------------------------------------------------------------

def _read_task_yaml(path: Path) -> dict[str, Any]:
    """The task YAML's keys (lm-eval's ``!function`` tags kept as plain strings)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: str(getattr(node, "value", "")))
    try:
        doc = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"eval.lm_eval.tasks: cannot read task file {path}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not doc.get("task"):
        raise ConfigError(f"eval.lm_eval.tasks: {path} is not an lm-eval task YAML (no 'task')")
    return doc


def _data_files(kwargs: dict[str, Any]) -> list[str]:
    files = kwargs.get("data_files") or []
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    return [files] if isinstance(files, str) else list(files)


def check_task_file(path: Path) -> str:
    """The task name of a local task YAML; a ConfigError if it reads anything not local."""
    doc = _read_task_yaml(path)
    source = str(doc.get("dataset_path") or "")
    if source in FILE_BUILDERS:
        files = _data_files(doc.get("dataset_kwargs") or {})
        if not files:
            raise ConfigError(f"eval.lm_eval.tasks: {path} names no dataset_kwargs.data_files")
        for f in files:
            if not Path(f).expanduser().is_file():   # (datasets reads it from the cwd)
                raise ConfigError(f"eval.lm_eval.tasks: data file of task {doc['task']} "
                                  f"does not exist: {f}")
    elif not (source and Path(source).is_dir()):
        raise ConfigError(f"eval.lm_eval.tasks: task {doc['task']} ({path}) reads "
                          f"dataset_path {source!r}, which is not a local folder or file "
                          f"builder ({', '.join(sorted(FILE_BUILDERS))}); hub downloads are off")
    return str(doc["task"])


def check(cfg, modality: str) -> None:
    """Before any work: lm_eval installed, a language model, every task local."""
    tasks = settings(cfg)["tasks"]
    if not tasks:
        return
    if modality != "text":
        raise ConfigError(f"eval.lm_eval.tasks: zero-shot tasks need a language model, "
                          f"model={cfg.model.name} is {modality}")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("eval.lm_eval.tasks needs lm-eval: pip install 'lm_eval>=0.4.9'") \
            from None
    for task in tasks:
        if str(task) in EMBEDDED:
            continue
        path = Path(str(task)).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.lm_eval.tasks: {task!r} is neither an embedded task "
                              f"({', '.join(EMBEDDED)}) nor a task YAML file")
        check_task_file(path)


def task_files(tasks: list[str], cache: Path) -> list[Path]:
    return [EMBEDDED[t](cache) if t in EMBEDDED else Path(t).expanduser() for t in tasks]


# -- evaluation ----------------------------------------------------------------------------------

@contextmanager
def offline():
    """The HF hub and datasets switched off for the block (nothing is downloaded)."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def metric_name(key: str) -> str:
    """lm-eval's ``acc,none`` -> ``acc``; ``acc,<filter>`` -> ``acc_<filter>``."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def flatten(results: dict[str, dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """``{task: {"acc,none": x}}`` -> ``{prefix + "lm_eval/task/acc": x}`` (numbers only)."""
    return {f"{prefix}lm_eval/{task}/{metric_name(k)}": float(v)
            for task, values in results.items() for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "alias"}


def run_tasks(model: nn.Module, tokenizer, files: list[Path], limit=None, batch_size=8,
              num_fewshot=None) -> dict[str, dict[str, Any]]:
    """``lm_eval.simple_evaluate`` of ``model`` on the task YAMLs ``files``: task -> metrics."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from compresslab.data.text import transformers_tokenizer

    names = [str(_read_task_yaml(f)["task"]) for f in files]
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with offline():
        manager = TaskManager(include_path=sorted({str(f.parent) for f in files}),
                              include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=transformers_tokenizer(tokenizer),
                  batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=False,
                              bootstrap_iters=100, verbosity="ERROR")
    return {t: out["results"][t] for t in names}


def evaluate(model: nn.Module, ctx, prefix: str = "") -> dict[str, float]:
    """The run's ``eval.lm_eval`` tasks on ``model`` as flat metrics ({} when off)."""
    s = settings(ctx.cfg)
    if not s["tasks"]:
        return {}
    files = task_files([str(t) for t in s["tasks"]], Path(ctx.cfg.paths.cache))
    was_training = model.training
    model.eval()
    results = run_tasks(model, ctx.data.shared_tokenizer(), files, s["limit"],
                        s["batch_size"], s["num_fewshot"])
    model.train(was_training)
    return flatten(results, prefix)
