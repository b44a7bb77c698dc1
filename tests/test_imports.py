"""The module graph of components/: no cycle, and no module reaches into a step for a helper."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

COMPONENTS = Path(__file__).resolve().parent.parent / "components"
# The pipeline's steps: each is run (by pipeline.py or its own CLI), never imported by another
# module; what two of them share lives in a module of its own (model, records, storage, ...).
STEPS = {"preprocess", "train", "evaluate", "export"}


def imports_of(path: Path) -> set[str]:
    """Every components.* module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "components":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {
                alias.name.split(".")[1] for alias in node.names if alias.name.startswith("components.")
            }
    return found - {path.stem}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in COMPONENTS.glob("*.py") if path.stem != "__init__"}


def test_no_module_imports_a_step(graph):
    reaching = {module: sorted(imported & STEPS) for module, imported in graph.items() if imported & STEPS}
    assert reaching == {}


def test_the_module_graph_has_no_cycle(graph):
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The checks above would pass vacuously if function-level imports went unseen."""
    source = tmp_path / "probe.py"
    source.write_text(
        "def f():\n    from components.train import train\n    from components import records\n"
    )
    assert imports_of(source) == {"train", "records"}


REPO = COMPONENTS.parent
# components/__init__.py says why these, and only these, are imported inside functions.
LAZY = {"tensorflow", "keras", "jax", "jaxlib", "tensorflow_datasets", "onnx", "tf2onnx", "onnxruntime"}
# The model server (kserve: FastAPI, uvicorn, gRPC; 1.4 s to import) is loaded by commands.py
# only for `serve`, so that every other command stays instant.
LAZY_MODULES = {"components.serve"}
# KFP ships only a step adapter's own source into the pod: everything it uses is imported inside.
KFP_ADAPTERS = {"fingerprint", "preprocess_slice", "preprocess", "train", "evaluate", "export", "notify"}


def imports_inside_functions(path: Path) -> list[str]:
    """`file:line module` for each import inside a function that is not of a LAZY package."""
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if path.name == "pipeline.py" and function.name in KFP_ADAPTERS:
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or "."]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            found += [
                f"{path.name}:{node.lineno} {module}"
                for module in modules
                if module.split(".")[0] not in LAZY and module not in LAZY_MODULES
            ]
    return found


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *COMPONENTS.glob("*.py"),
            *(REPO / name for name in ("pipeline.py", "local_run.py", "commands.py", "cluster.py")),
        ]
    ),
    ids=lambda path: path.name,
)
def test_imports_are_at_the_top_but_for_the_heavy_frameworks(path):
    assert imports_inside_functions(path) == []


def test_the_import_rule_sees_a_project_import_inside_a_function(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "def f():\n    import tensorflow as tf\n    from components import records\n    import json\n"
    )
    assert imports_inside_functions(source) == ["probe.py:3 components", "probe.py:4 json"]
