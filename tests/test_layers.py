"""The tree's import direction (ARCHITECTURE.md): data contract <- LLM layer <- stages <- training <-
orchestration <- command line. A module importing a layer above its own fails here, so that standard
import-graph tools keep reading the tree as the data flow."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

LAYERS = {
    "pipeline.data": 0,
    "pipeline.llm": 1,
    "pipeline.retrieval": 1,
    "pipeline.stages": 2,
    "train": 3,
    "mpr.simulated_judge": 4,
    "mpr.orchestrate": 4,
    "mpr.llama": 4,
    "mpr.commands": 5,
}


def _layer(module: str) -> str | None:
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for package in ("pipeline", "train", "mpr"):
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            own = _layer(module)
            if own is None:
                continue
            upward += [
                f"{module} -> {name}"
                for name in sorted(_imports(path))
                if (target := _layer(name)) is not None and LAYERS[target] > LAYERS[own]
            ]
    assert upward == []


def test_stages_never_import_training_and_pipeline_never_imports_mpr():
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        bad = [n for n in _imports(path) if n.split(".")[0] in ("train", "mpr")]
        assert bad == [], f"{path}: {bad}"
