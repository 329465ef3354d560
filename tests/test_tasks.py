"""Metrics equal hand computations."""

import math

import torch
from torch import nn

from compresslab.models.architecture import ArchitectureAdapter
from compresslab.tasks import ClassificationTask, LanguageModelingTask


class FixedLogits(nn.Module):
    """A toy LM whose next-token distribution depends only on the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids]


class Direct(ArchitectureAdapter):
    modality = "text"


def test_perplexity_equals_hand_computation():
    table = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 1.0, 3.0]],
                         dtype=torch.float64)
    model, task = FixedLogits(table), LanguageModelingTask()
    batches = [torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]]), torch.tensor([[1, 1, 0, 2]])]
    sums = {}
    for b in batches:
        for k, v in task.eval_sums(model, Direct(), b).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    nll, count = 0.0, 0
    for b in batches:
        for row in b.tolist():
            for cur, nxt in zip(row, row[1:]):
                logits = table[cur].tolist()
                log_z = math.log(sum(math.exp(v) for v in logits))
                nll += log_z - logits[nxt]
                count += 1
    metrics = task.metrics(sums)
    assert count == 9
    assert math.isclose(metrics["ppl"], math.exp(nll / count), rel_tol=1e-12)
    assert math.isclose(metrics["loss"], nll / count, rel_tol=1e-12)


def test_accuracy_counts_correct_predictions():
    class Lookup(nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [5.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    task = ClassificationTask()
    sums = {k: float(v) for k, v in task.eval_sums(Lookup(), Direct(), (logits, labels)).items()}
    assert task.metrics(sums)["acc"] == 0.5
