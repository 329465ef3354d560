"""Sample-quality stage: generate from the (compressed) model and score the samples.

Works with datasets that can score generated samples (``sample_quality``), e.g.
``digit_tokens``: a grid PNG per class in the run folder and the accuracy of a
fixed classifier on the generated images, logged as ``<stage>/classifier_acc``.
"""

from __future__ import annotations

import time

from compresslab.errors import ConfigError
from compresslab.stages.base import Stage


class SampleQualityStage(Stage):
    """``per_class`` samples of every class drawn with ``seed``; the grid goes to ``png``."""

    changes_model = False

    def __init__(self, per_class: int = 10, seed: int = 0, png: str = "samples.png"):
        self.per_class, self.seed, self.png = per_class, seed, png

    def check(self, model, ctx):
        if not hasattr(ctx.data, "sample_quality"):
            raise ConfigError(f"stage {self.name}: dataset {type(ctx.data).__name__} cannot "
                              f"score generated samples (use dataset=digit_tokens)")
        if self.per_class < 1:
            raise ConfigError(f"stage {self.name}: per_class must be at least 1")

    def run(self, model, ctx):
        start = time.perf_counter()
        scores = ctx.data.sample_quality(model, ctx.adapter, self.per_class, self.seed,
                                         ctx.run_dir / self.png)
        ctx.log({**{f"{self.name}/{k}": v for k, v in scores.items()},
                 f"{self.name}/time_s": time.perf_counter() - start})
        return model
