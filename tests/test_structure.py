"""The package's structure: no import circles, and every layer kind a plan can name
writes itself and is rebuilt to the same structure."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from compresslab.compress.kpsvd import KronShape
from compresslab.layers import (
    FORMS,
    KroneckerAdapterLinear,
    LowRankLinear,
    PrunedLinear,
    ResizedLinear,
    apply_plan,
    plan_of,
)

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "compresslab"


def import_graph() -> dict[str, set[str]]:
    """Module -> compresslab modules it imports (at any depth of the file, lazy imports too,
    and the packages those run first)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                            else node.module for a in node.names}
        # importing a.b.c runs package a.b first (the root package's own imports are lazy)
        targets |= {t.rsplit(".", 1)[0] for t in targets
                    if t.count(".") > 1 and not name.startswith(t.rsplit(".", 1)[0])}
        if "pkgutil.iter_modules(__path__)" in path.read_text():   # imports its whole folder
            targets |= {m for m in modules if m.rsplit(".", 1)[0] == name}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_circles():
    assert circles(import_graph()) == []


def test_low_level_modules_import_nothing_above_them():
    graph = import_graph()
    for low in ("compresslab.layers.base", "compresslab.weights_io", "compresslab.seeding",
                "compresslab.run_folder", "compresslab.filesystem"):
        above = {t for t in graph[low] if t.startswith(("compresslab.stages",
                                                         "compresslab.pipeline",
                                                         "compresslab.checkpoints",
                                                         "compresslab.resume"))}
        assert not above, (low, above)


LAYERS = {
    "lowrank": lambda: LowRankLinear(6, 5, 3, bias=True),
    "kronecker_adapter": lambda: KroneckerAdapterLinear(8, 15, KronShape(3, 4, 5, 2), 2),
    "resized_linear": lambda: ResizedLinear(4, 7, bias=False),
    "pruned_linear": lambda: PrunedLinear(4, 7),
}


def test_every_registered_kind_is_in_the_table():
    assert set(FORMS) == set(LAYERS)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_layer_is_rebuilt_from_its_entry_to_the_same_structure(kind):
    layer = LAYERS[kind]()
    entry = layer.plan_entry()
    assert entry["kind"] == kind == layer.kind
    rebuilt = FORMS[kind].from_plan(entry, torch.float64)
    assert type(rebuilt) is type(layer) and rebuilt.plan_entry() == entry
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}
    assert all(p.dtype == torch.float64 for p in rebuilt.parameters())


def test_plan_of_a_model_applies_back_onto_the_dense_model():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    compressed = nn.Sequential(LowRankLinear(6, 5, 2), PrunedLinear(5, 3))
    compressed[1].counts = {"channels": 3}
    plan = plan_of(compressed)
    assert plan["1"] == {"kind": "pruned_linear", "in_features": 5, "out_features": 3,
                         "bias": True, "channels": 3}
    rebuilt = apply_plan(model, plan)
    assert plan_of(rebuilt) == plan
    rebuilt.load_state_dict(compressed.state_dict())
    x = torch.randn(2, 6)
    assert torch.equal(rebuilt(x), compressed(x))
