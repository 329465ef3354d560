"""Question answering by generation: answer-only training loss, greedy decoding and
exact match of the extracted answer (the ``arithmetic``, ``gsm8k`` and ``mbpp`` tasks).

Batches are dicts: ``input_ids`` (B, T) prompt + answer, right-padded; ``labels`` the
same ids with -100 on prompt and padding; ``prompt_len`` (B,); ``gold`` the reference
answers as strings. Greedy decoding runs on right-padded rows with each row reading
the logits at its own last position: a causal model never looks at later positions,
so padding needs no attention mask and the architecture adapter's ``logits`` suffices.
Rows whose reference answer is already the argmax at every teacher-forced position are
counted correct without generating (greedy decoding would reproduce them exactly).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import ConfigError
from compresslab.models.architecture import ArchitectureAdapter
from compresslab.tasks import Task

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class FinalNumber:
    """The number after the last ``####`` (GSM8K style), else the last number."""

    def __call__(self, text: str) -> str | None:
        tail = text.rsplit("####", 1)[-1] if "####" in text else text
        found = _NUMBER.findall(tail)
        if not found:
            return None
        number = (found[0] if "####" in text else found[-1]).replace(",", "")
        return number[:-2] if number.endswith(".0") else number


class WholeText:
    """The generated text with whitespace runs collapsed (code answers, MBPP style)."""

    def __call__(self, text: str) -> str | None:
        return " ".join(text.split()) or None


EXTRACTORS = {"final_number": FinalNumber, "whole_text": WholeText}


def answer_extractor(name: str):
    if name not in EXTRACTORS:
        raise ConfigError(f"unknown answer extractor {name!r} ({' | '.join(EXTRACTORS)})")
    return EXTRACTORS[name]()


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Next-token cross-entropy on the positions whose label is not -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction=reduction)


@torch.no_grad()
def greedy_generate(model: nn.Module, adapter: ArchitectureAdapter, prompts: list[torch.Tensor],
                    max_new_tokens: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Greedy continuation of each prompt (stops at ``eos_id``), without the prompt."""
    lengths = torch.tensor([len(p) for p in prompts])
    rows = torch.full((len(prompts), int(lengths.max()) + max_new_tokens), pad_id,
                      dtype=torch.long, device=prompts[0].device)
    for i, p in enumerate(prompts):
        rows[i, :len(p)] = p
    lengths = lengths.to(rows.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=rows.device)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = adapter.logits(model, rows[:, :int(lengths.max())])
        nxt = logits[torch.arange(len(prompts)), lengths - 1].argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            token = int(nxt[i])
            if token == eos_id:
                done[i] = True
                continue
            out[i].append(token)
            rows[i, lengths[i]] = token
            lengths[i] += 1
        if bool(done.all()):
            break
    return out


class GenerativeQATask(Task):
    """Loss: NLL of the answer tokens. Metrics: ``exact_match`` (greedy generation,
    extracted answer == gold), ``loss`` (answer NLL per token)."""

    primary_metric, higher_is_better = "exact_match", True

    def __init__(self, extractor: str = "final_number", max_new_tokens: int = 48):
        self.extract = answer_extractor(extractor)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = None       # a data.text.BPETokenizer, set by the datamodule's load()

    def loss(self, model, adapter, batch):
        return answer_nll(adapter.logits(model, batch["input_ids"]), batch["labels"])

    def answers(self, model, adapter, batch, rows: list[int]) -> list[str]:
        """Greedy answers of the given rows of the batch."""
        prompts = [batch["input_ids"][i, :int(batch["prompt_len"][i])] for i in rows]
        if not prompts:
            return []
        eos = self.tokenizer.eos_id
        generated = greedy_generate(model, adapter, prompts, self.max_new_tokens, eos, eos)
        return [self.tokenizer.decode(ids) for ids in generated]

    def reproduced(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Rows whose whole reference answer, end-of-text included, is the argmax at every
        position: greedy decoding reproduces exactly these, so they need no generation
        (ties aside, the same decision as generating)."""
        target = labels[:, 1:]
        hit = (logits[:, :-1].argmax(-1) == target) | (target == -100)
        last = labels.gather(1, ((labels != -100).cumsum(1).argmax(1))[:, None]).squeeze(1)
        return hit.all(1) & (last == self.tokenizer.eos_id)

    def eval_sums(self, model, adapter, batch):
        logits = adapter.logits(model, batch["input_ids"])
        nll = answer_nll(logits, batch["labels"], "sum")
        known = self.reproduced(logits, batch["labels"]).tolist()
        rows = [i for i, ok in enumerate(known) if not ok]
        texts = self.answers(model, adapter, batch, rows)
        correct = sum(known) + sum(
            self.extract(t) is not None and self.extract(t) == self.extract(batch["gold"][i])
            for i, t in zip(rows, texts))
        f64 = torch.float64
        return {"nll": nll.double(),
                "tokens": (batch["labels"][:, 1:] != -100).sum().to(f64),
                "correct": torch.tensor(float(correct), dtype=f64),
                "count": torch.tensor(float(len(known)), dtype=f64)}

    def metrics(self, sums):
        return {"loss": sums["nll"] / sums["tokens"],
                "exact_match": sums["correct"] / sums["count"]}
