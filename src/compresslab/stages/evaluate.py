"""A stage that only measures: evaluates the model as it is at that point of the method.

Put between other stages to see what each one did, e.g. the accuracy right after a
decomposition and again after an intermediate training stage. Logs
``<stage>/<split>_<metric>`` for each split; the model is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from compresslab.errors import ConfigError
from compresslab.stages.base import Stage


class EvaluateStage(Stage):
    """``splits``: data splits to evaluate (``train`` | ``val`` | ``test``)."""

    changes_model = False

    def __init__(self, splits: Sequence[str] = ("test",)):
        self.splits = list(splits)

    def check(self, model, ctx):
        unknown = set(self.splits) - {"train", "val", "test"}
        if unknown or not self.splits:
            raise ConfigError(f"stage {self.name}: splits must be among train, val, test; "
                              f"got {self.splits}")

    def run(self, model, ctx):
        from compresslab.pipeline import evaluate

        for split in self.splits:
            ctx.log({f"{self.name}/{split}_{k}": v for k, v in evaluate(model, ctx, split).items()})
        return model
