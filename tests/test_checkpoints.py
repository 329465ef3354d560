"""Safe on-disk formats: damaged or mismatched files get one clear line, never a pickle."""

import json
from pathlib import Path

import pytest
import torch

from compresslab.checkpoints import load_compressed, save_compressed
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.layers import apply_plan
from compresslab.layers.lowrank import LowRankLinear
from compresslab.models.deep_linear import DeepLinear
from compresslab.weights_io import load_state, read_state_dict, save_state

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
    from compresslab.models.llama import TinyLlama

    model = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24).build(
        DataSpec("text", vocab_size=30))
    save_state(model, tmp_path / "m.safetensors")
    fresh = TinyLlama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24).build(
        DataSpec("text", vocab_size=30))
    load_state(fresh, tmp_path / "m.safetensors")
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight)


# -- safe loading: what a file may make the loader do --------------------------------------

SOURCE_FILES = sorted((Path(__file__).resolve().parents[1] / "src").rglob("*.py")) + [
    Path(__file__).resolve().parents[1] / "run.py"]


def _calls(path: Path):
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(
                func.value, ast.Name) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}, node.lineno


def _is_true(node) -> bool:
    import ast

    return isinstance(node, ast.Constant) and node.value is True


def test_source_never_unpickles_or_trusts_remote_code_by_itself():
    """Every ``torch.load`` and Lightning checkpoint load is weights-only, nothing calls
    pickle/dill/joblib loaders or ``np.load(allow_pickle=True)``, and
    ``trust_remote_code`` is only ever passed on from the user's setting."""
    import ast

    problems = []
    for path in SOURCE_FILES:
        text = path.read_text()
        for owner, name, kw, line in _calls(path):
            where = f"{path.name}:{line}"
            if (owner, name) == ("torch", "load") and not _is_true(kw.get("weights_only")):
                problems.append(f"{where}: torch.load without weights_only=True")
            if name == "fit" and "ckpt_path" in kw and not _is_true(kw.get("weights_only")):
                problems.append(f"{where}: a checkpoint resumed without weights_only=True")
            if owner in ("pickle", "dill", "joblib", "cloudpickle") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if name == "load" and owner in ("np", "numpy") and _is_true(kw.get("allow_pickle")):
                problems.append(f"{where}: np.load(allow_pickle=True)")
            if "trust_remote_code" in kw:
                value = kw["trust_remote_code"]
                passed_on = (isinstance(value, ast.Attribute) and value.attr == "trust_remote_code"
                             ) or (isinstance(value, ast.Name) and value.id == "trust_remote_code")
                if not passed_on and not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where}: trust_remote_code={ast.unparse(value)}")
        if "torch.jit.load" in text:
            problems.append(f"{path.name}: torch.jit.load")
    assert not problems, problems


def test_trust_remote_code_defaults_to_false_everywhere():
    """The only switch is the user's ``model.source.trust_remote_code`` (default false)."""
    import inspect

    from omegaconf import OmegaConf

    from compresslab.checkpoints import load_compressed as load_fn
    from compresslab.models.llama import LocalHFCausalLM

    defaults = inspect.signature(LocalHFCausalLM).parameters
    assert defaults["trust_remote_code"].default is False
    assert inspect.signature(load_fn).parameters["trust_remote_code"].default is False
    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in configs.rglob("*.yaml"):
        if "trust_remote_code" in path.read_text():
            found = OmegaConf.select(OmegaConf.load(path), "source.trust_remote_code")
            assert found is False, path


def test_truncated_plan_is_reported(tmp_path):
    _, folder = _compressed(tmp_path)
    text = (folder / "plan.json").read_text()
    (folder / "plan.json").write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match="is not valid JSON .truncated or damaged"):
        load_compressed(folder)


def test_damaged_weights_header_is_reported(tmp_path):
    _, folder = _compressed(tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\x00garbage!!!\x00"
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="cannot read weights file"):
        load_compressed(folder)


@pytest.mark.parametrize("change,message", [
    (lambda plan: plan["layers"].pop("layers.0"), "do not match the model .* unexpected"),
    (lambda plan: plan["layers"]["layers.0"].pop("rank"), "lacks 'rank'"),
    (lambda plan: plan["layers"]["layers.0"].update(in_features=7), "do not match the model"),
    (lambda plan: plan.pop("layers"), "lacks 'layers'"),
    (lambda plan: plan["data_spec"].update(colour="red"), "bad data_spec"),
], ids=["missing entry", "entry without rank", "wrong shape", "no layers", "bad data_spec"])
def test_plan_that_does_not_fit_is_reported(tmp_path, change, message):
    _, folder = _compressed(tmp_path)
    plan = json.loads((folder / "plan.json").read_text())
    change(plan)
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=message):
        load_compressed(folder)


@pytest.mark.parametrize("source,message", [
    ({"_target_": "os.system", "command": "touch PWNED"}, "not a compresslab model source"),
    ({"_target_": "compresslab.checkpoints.save_state"}, "not a compresslab model source"),
    ({"_target_": "compresslab.models.sources.NoSuchSource"}, "unknown model source"),
    ({"_target_": "compresslab.models.sources.DeepLinear", "depth": 2,
      "width": {"_target_": "os.getcwd"}}, "may not name objects"),
], ids=["foreign callable", "not a source", "unknown source", "nested target"])
def test_plan_cannot_choose_code_to_run(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    _, folder = _compressed(tmp_path)
    plan = json.loads((folder / "plan.json").read_text())
    plan["model"]["source"] = source
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=message):
        load_compressed(folder)
    assert not (tmp_path / "PWNED").exists()


def test_trust_remote_code_comes_from_the_caller_not_the_plan():
    from compresslab.checkpoints import safe_source

    source = {"_target_": "compresslab.models.sources.LocalHFCausalLM", "path": "/ckpt",
              "dtype": "float32", "trust_remote_code": True}
    assert safe_source(source, "plan").trust_remote_code is False
    assert safe_source(source, "plan", trust_remote_code=True).trust_remote_code is True
