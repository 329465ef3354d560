"""digit_tokens: class-conditional pixel sequences, bits per pixel, sample scoring."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from compresslab.data.digit_tokens import DigitTokensDataModule
from compresslab.data.digits import digits_arrays
from compresslab.errors import ConfigError
from compresslab.models.architecture import adapter_for
from compresslab.models.llama import TinyLlama
from compresslab.stages.base import RunContext
from compresslab.stages.samples import SampleQualityStage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    dm = DigitTokensDataModule(levels=4)
    dm.check()
    dm.load()
    return dm


def test_sequences_are_class_token_then_quantised_raster_pixels(data):
    images, labels = digits_arrays()
    train = data.split("train")
    assert train.shape[1] == 65 and data.spec().vocab_size == 14
    total = sum(len(data.split(s)) for s in ("train", "val", "test"))
    assert total == len(images)
    # every sequence is some image: class token 4 + label, pixels round(x * 3) in raster order
    expected = {tuple([4 + int(y), *np.rint(img.ravel() * 3).astype(int)])
                for img, y in zip(images, labels)}
    assert all(tuple(row.tolist()) in expected for row in train[:50])
    assert int(train[:, 1:].max()) == 3 and int(train[:, 0].min()) >= 4


def test_bits_per_pixel_is_nll_over_ln2(data):
    torch.manual_seed(0)
    model = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16).build(
        data.spec()).eval()
    adapter = adapter_for(model)
    batch = data.split("test")[:8]
    sums = data.task.eval_sums(model, adapter, batch)
    assert float(sums["tokens"]) == 8 * 64
    logits = adapter.logits(model, batch)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    out = data.task.metrics({k: float(v) for k, v in sums.items()})
    assert out["bpp"] == pytest.approx(float(nll) / math.log(2), rel=1e-5)


def test_samples_are_scored_and_drawn_as_a_grid(data, tmp_path):
    torch.manual_seed(0)
    model = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16).build(
        data.spec()).eval()
    ctx = RunContext(cfg=OmegaConf.create({}), run_dir=tmp_path, adapter=adapter_for(model),
                     data=data)
    stage = SampleQualityStage(per_class=2, seed=0)
    stage.name = "samples"
    stage.check(model, ctx)
    stage.run(model, ctx)
    assert (tmp_path / "samples.png").is_file()
    assert ctx.metrics["samples/classifier_real_acc"] > 0.85   # the classifier works on digits
    assert 0 <= ctx.metrics["samples/classifier_acc"] <= 1
    images, labels = data.generate(model, ctx.adapter, per_class=2, seed=0)
    assert images.shape == (20, 64) and 0 <= int(images.min()) and int(images.max()) <= 3
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    again, _ = data.generate(model, ctx.adapter, per_class=2, seed=0)
    assert torch.equal(images, again)


def test_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="levels must be in"):
        DigitTokensDataModule(levels=1).check()
    ctx = RunContext(cfg=OmegaConf.create({}), run_dir=tmp_path, adapter=None, data=object())
    stage = SampleQualityStage()
    stage.name = "samples"
    with pytest.raises(ConfigError, match="cannot score generated samples"):
        stage.check(None, ctx)
