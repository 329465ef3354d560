"""The library API: stages applied to a model outside a run (compresslab.api)."""

import copy

import pytest
import torch

from compresslab.api import compress_model, context, named_stages
from compresslab.compress.decomposer import PlainSVD
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.layers import plan_of
from compresslab.models.llama import TinyLlama
from compresslab.stages.base import Stage
from compresslab.stages.compress import LowRankStage

SPEC = DataSpec("text", vocab_size=40)


def tiny():
    torch.manual_seed(0)
    return TinyLlama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24).build(SPEC)


def test_full_rank_svd_through_the_api_reproduces_the_model():
    dense = tiny().eval()
    result = compress_model(copy.deepcopy(dense), {"compress": LowRankStage(PlainSVD(), rank=16)})
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids).logits, dense(ids).logits,
                                   atol=1e-5, rtol=1e-5)
    assert result.plan == plan_of(result.model) and len(result.plan) == 7
    assert result.metrics["compress/layers"] == 7 and "compress/time_s" in result.metrics


class Noise(Stage):
    """Adds seeded noise to one weight: the result depends on the stage seed only."""

    def run(self, model, ctx):
        with torch.no_grad():
            model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
        ctx.log({f"{self.name}/norm": float(model.lm_head.weight.norm())})
        return model


def test_each_stage_is_seeded_by_its_place_so_skipping_finished_ones_gives_the_same_model():
    whole = compress_model(tiny(), {"first": Noise(), "second": Noise()}, seed=3)
    first = compress_model(tiny(), {"first": Noise()}, seed=3).model
    resumed = compress_model(first, named_stages({"first": Noise(), "second": Noise()}),
                             seed=3, start=1)
    assert torch.equal(resumed.model.lm_head.weight, whole.model.lm_head.weight)
    other = compress_model(tiny(), {"first": Noise(), "second": Noise()}, seed=4)
    assert not torch.equal(other.model.lm_head.weight, whole.model.lm_head.weight)


def test_a_bad_setting_is_refused_before_any_stage_runs():
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="ratio"):
        compress_model(model, {"compress": LowRankStage(PlainSVD(), ratio=0.4),
                               "again": LowRankStage(PlainSVD(), ratio=1.5)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_named_stages_refuse_what_is_not_a_stage_and_context_has_library_defaults():
    with pytest.raises(ConfigError, match="not a Stage"):
        named_stages({"x": object()})
    ctx = context(tiny(), data=None)
    assert ctx.cfg.progress is False and ctx.cfg.trainer.accelerator == "cpu"
