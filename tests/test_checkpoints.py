"""Safe on-disk formats: damaged or mismatched files get one clear line, never a pickle."""

import json

import pytest
import torch

from compresslab.checkpoints import (
    apply_plan,
    load_compressed,
    load_state,
    read_state_dict,
    save_compressed,
    save_state,
)
from compresslab.compress.lowrank import LowRankLinear
from compresslab.errors import ConfigError
from compresslab.models.sources import DataSpec, DeepLinear

PLAN_MODEL = {"name": "dln", "source": {"_target_": "compresslab.models.sources.DeepLinear",
                                        "depth": 2, "width": 6, "init_scale": 0.1,
                                        "dtype": "float64"}}
SPEC = {"modality": "matrix", "matrix_shape": [5, 5]}


def _compressed(tmp_path):
    torch.manual_seed(0)
    model = DeepLinear(depth=2, width=6, init_scale=0.1).build(DataSpec("matrix",
                                                                        matrix_shape=(5, 5)))
    layer = model.layers[0]
    low = LowRankLinear(5, 6, 3, bias=False, dtype=torch.float64)
    model.layers[0] = low
    plan = {"layers.0": {"kind": "lowrank", "rank": 3, "in_features": 5, "out_features": 6,
                         "bias": False}}
    folder = save_compressed(model, tmp_path / "c", {"model": PLAN_MODEL, "data_spec": SPEC,
                                                     "layers": plan})
    assert layer.weight.shape == (6, 5)
    return model, folder


def test_round_trip_gives_identical_outputs(tmp_path):
    model, folder = _compressed(tmp_path)
    again = load_compressed(folder)
    torch.testing.assert_close(again.end_to_end(), model.end_to_end(), rtol=0, atol=0)


def test_truncated_weights_file_is_reported(tmp_path):
    _, folder = _compressed(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ConfigError, match="cannot read weights file"):
        load_compressed(folder)


def test_plan_that_does_not_match_weights_is_reported(tmp_path):
    _, folder = _compressed(tmp_path)
    plan = json.loads((folder / "plan.json").read_text())
    plan["layers"]["layers.0"]["rank"] = 4
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match="do not match the model"):
        load_compressed(folder)


def test_damaged_or_foreign_plan_is_reported(tmp_path):
    _, folder = _compressed(tmp_path)
    (folder / "plan.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_compressed(folder)
    (folder / "plan.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ConfigError, match="has format"):
        load_compressed(folder)
    with pytest.raises(ConfigError, match="has no plan.json"):
        load_compressed(tmp_path)


def test_plan_naming_missing_module_or_kind_is_reported():
    model = DeepLinear(depth=2).build(DataSpec("matrix", matrix_shape=(4, 4)))
    with pytest.raises(ConfigError, match="does not have"):
        apply_plan(model, {"layers.7": {"kind": "lowrank"}})
    with pytest.raises(ConfigError, match="unknown kind"):
        apply_plan(model, {"layers.0": {"kind": "mystery"}})


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "weights.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ConfigError, match="cannot read weights file"):
        read_state_dict(path)
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))


def test_tied_weights_are_stored_once_and_re_shared(tmp_path):
    from compresslab.models.sources import TinyLlama

    model = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24).build(
        DataSpec("text", vocab_size=30))
    save_state(model, tmp_path / "m.safetensors")
    fresh = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24).build(
        DataSpec("text", vocab_size=30))
    load_state(fresh, tmp_path / "m.safetensors")
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight)
