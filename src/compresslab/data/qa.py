"""Question-answer datasets for adapter fine-tuning, scored by generated exact match.

- ``arithmetic``: embedded, seeded multi-step word problems ("Ada has 7 pens. She buys
  5 more. ..."), answers with their working and ``#### N`` (GSM8K format); the test
  questions never appear in train or val.
- ``gsm8k`` / ``mbpp``: local JSONL files (GSM8K ``question``/``answer``; MBPP
  ``text``/``code``/``test_list``) through :class:`JsonlQADataModule`.

Each example is tokenized as ``prompt`` + ``answer`` + end-of-text; the loss covers
the answer only. Without a shared tokenizer a byte-level BPE is trained on train.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from compresslab.data.base import TaskDataModule
from compresslab.data.spec import DataSpec
from compresslab.data.text import BPETokenizer, train_bpe
from compresslab.errors import ConfigError
from compresslab.generation import GenerativeQATask

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class QAExample:
    question: str
    answer: str      # the training target (working + final answer)
    gold: str        # what exact match compares against


class TokenizedQA(Dataset):
    def __init__(self, examples: list[QAExample], tokenizer: BPETokenizer, max_length: int,
                 prompt_format: str):
        self.items = []
        eos = tokenizer.eos_id
        for ex in examples:
            prompt = _ids(tokenizer, prompt_format.format(question=ex.question))
            answer = _ids(tokenizer, " " + ex.answer) + [eos]
            ids = (prompt + answer)[:max_length]
            self.items.append((torch.tensor(ids), min(len(prompt), max_length - 1), ex.gold))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _ids(tokenizer: BPETokenizer, text: str) -> list[int]:
    backend = tokenizer.backend
    if tokenizer.is_fast_lib:
        return backend.encode(text).ids
    return backend(text, add_special_tokens=False)["input_ids"]


def collate(pad_id: int):
    def fn(items):
        width = max(len(ids) for ids, _, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for i, (ids, prompt_len, _) in enumerate(items):
            input_ids[i, :len(ids)] = ids
            labels[i, prompt_len:len(ids)] = ids[prompt_len:]
        return {"input_ids": input_ids, "labels": labels,
                "prompt_len": torch.tensor([p for _, p, _ in items]),
                "gold": [g for _, _, g in items]}
    return fn


class QADataModule(TaskDataModule):
    """Base of the question-answer datasets; subclasses implement :meth:`examples`."""

    modality = "text"
    name = "qa"

    def __init__(self, max_length: int = 128, vocab_size: int = 512, max_new_tokens: int = 48,
                 extractor: str = "final_number",
                 prompt_format: str = "Question: {question}\nAnswer:", **kwargs):
        super().__init__(**kwargs)
        self.max_length, self.vocab_size, self.prompt_format = max_length, vocab_size, prompt_format
        self.task = GenerativeQATask(extractor, max_new_tokens)
        self.tokenizer: BPETokenizer | None = None
        self.info: dict[str, Any] = {}

    def examples(self, split: str) -> list[QAExample]:
        raise NotImplementedError

    def load(self, tokenizer: Any | None = None) -> None:
        data = {s: self.examples(s) for s in SPLITS}
        if tokenizer is None:
            texts = [f"{e.question} {e.answer}" for e in data["train"]]
            tokenizer = train_bpe(texts, self.vocab_size)
        self.tokenizer = self.task.tokenizer = BPETokenizer(tokenizer)
        self._splits = {s: TokenizedQA(data[s], self.tokenizer, self.max_length,
                                       self.prompt_format) for s in SPLITS}
        self.info = {"corpus": self.name, "examples": {s: len(data[s]) for s in SPLITS},
                     "vocab_size": self.tokenizer.vocab_size}

    def shared_tokenizer(self):
        return self.tokenizer.backend if self.tokenizer else None

    def spec(self) -> DataSpec:
        vocab = self.tokenizer.vocab_size if self.tokenizer else self.vocab_size
        return DataSpec("text", vocab_size=vocab)

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        return DataLoader(self.split(name), batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, generator=generator,
                          collate_fn=collate(self.tokenizer.eos_id),
                          drop_last=shuffle and len(self.split(name)) > batch_size)


# -- arithmetic word problems -----------------------------------------------------------------

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon")
ITEMS = ("apples", "pens", "coins", "books", "cards", "stones", "shells", "cups")
ADD = ("buys {n} more", "finds {n} more", "gets {n} more")
SUB = ("gives away {n}", "loses {n}", "sells {n}")


def word_problem(rng: random.Random, max_value: int, steps: int) -> QAExample:
    """One problem of ``steps`` additions/subtractions; the total never goes negative."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(1, max_value)
    sentences, working = [f"{name} has {total} {item}."], []
    for _ in range(steps):
        if total > 0 and rng.random() < 0.5:
            n = rng.randint(1, total)
            sentences.append(f"Then {name} {rng.choice(SUB).format(n=n)}.")
            working.append(f"{total} - {n} = {total - n}.")
            total -= n
        else:
            n = rng.randint(1, max_value)
            sentences.append(f"Then {name} {rng.choice(ADD).format(n=n)}.")
            working.append(f"{total} + {n} = {total + n}.")
            total += n
    question = " ".join(sentences) + f" How many {item} does {name} have?"
    return QAExample(question, " ".join(working) + f" #### {total}", str(total))


class ArithmeticDataModule(QADataModule):
    """Seeded multi-step arithmetic word problems; ``num_<split>`` distinct questions
    per split with ``min_steps``..``max_steps`` operations on numbers up to ``max_value``."""

    name = "arithmetic"

    def __init__(self, num_train: int = 4000, num_val: int = 100, num_test: int = 200,
                 min_steps: int = 1, max_steps: int = 2, max_value: int = 20,
                 data_seed: int = 1234, **kwargs):
        super().__init__(**kwargs)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.min_steps, self.max_steps, self.max_value = min_steps, max_steps, max_value
        self.data_seed = data_seed
        self._cache: dict[str, list[QAExample]] = {}

    def check(self) -> None:
        if min(self.sizes.values()) < 1:
            raise ConfigError("dataset=arithmetic: num_train, num_val and num_test must be >= 1")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"dataset=arithmetic: need 1 <= min_steps <= max_steps, got "
                              f"{self.min_steps}, {self.max_steps}")
        if self.max_value < 2:
            raise ConfigError(f"dataset=arithmetic: max_value must be >= 2, got {self.max_value}")

    def examples(self, split: str) -> list[QAExample]:
        if not self._cache:
            self._cache = self._generate()
        return self._cache[split]

    def _generate(self) -> dict[str, list[QAExample]]:
        """Test first, then val, then train, each skipping questions already drawn."""
        rng, seen, out = random.Random(self.data_seed), set(), {}
        for split in ("test", "val", "train"):
            found, tries = [], 0
            while len(found) < self.sizes[split]:
                tries += 1
                if tries > 50 * self.sizes[split]:
                    raise ConfigError(f"dataset=arithmetic: cannot draw {self.sizes[split]} "
                                      f"distinct {split} problems; raise max_value or max_steps")
                ex = word_problem(rng, self.max_value,
                                  rng.randint(self.min_steps, self.max_steps))
                if ex.question not in seen:
                    seen.add(ex.question)
                    found.append(ex)
            out[split] = found
        return out


# -- local JSONL files (GSM8K, MBPP) ----------------------------------------------------------

def gsm8k_example(row: dict) -> QAExample:
    answer = row["answer"].strip()
    gold = answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer
    return QAExample(row["question"].strip(), answer, gold)


def mbpp_example(row: dict) -> QAExample:
    tests = "\n".join(row.get("test_list", []))
    question = row["text"].strip() + (f"\n{tests}" if tests else "")
    return QAExample(question, row["code"].strip(), row["code"].strip())


JSONL_FORMATS = {"gsm8k": (gsm8k_example, ("question", "answer")),
                 "mbpp": (mbpp_example, ("text", "code"))}


class JsonlQADataModule(QADataModule):
    """Local JSONL files in ``format`` (gsm8k | mbpp); ``val`` defaults to the test file."""

    def __init__(self, format: str = "gsm8k", train: str | None = None, val: str | None = None,
                 test: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.format, self.name = format, format
        self.paths = {"train": train, "val": val or test, "test": test}

    def check(self) -> None:
        if self.format not in JSONL_FORMATS:
            raise ConfigError(f"unknown JSONL format {self.format!r} "
                              f"({' | '.join(JSONL_FORMATS)})")
        for split in ("train", "test"):
            path = self.paths[split]
            if not path:
                raise ConfigError(f"dataset={self.format} needs "
                                  f"dataset.{split}=/path/to/file.jsonl")
            if not Path(path).is_file():
                raise ConfigError(f"dataset.{split} file does not exist: {path}")

    def examples(self, split: str) -> list[QAExample]:
        make, keys = JSONL_FORMATS[self.format]
        path = self.paths[split]
        rows = []
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{number} is not valid JSON") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number} is not a JSON object")
            missing = [k for k in keys if k not in row]
            if missing:
                raise ConfigError(f"{path}:{number} lacks {', '.join(missing)} "
                                  f"(format {self.format})")
            wrong = [k for k in keys if not isinstance(row[k], str)]
            if wrong:
                raise ConfigError(f"{path}:{number}: {wrong[0]} must be a text, got "
                                  f"{type(row[wrong[0]]).__name__}")
            rows.append(make(row))
        return rows
