"""The registries are the only places that spell a stage's, a loss's or a backend's name: elsewhere code
compares against the registered entries, so adding one touches its module and its registry line only
(ARCHITECTURE.md, "Where to add")."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpr.orchestrate.stages import REGISTRY
from pipeline.llm.backends import AUTO, BACKENDS
from train.losses.registry import LOSSES

from .conftest import REPO


def _files(*folders: str, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.relative_to(REPO).as_posix() not in skip:
                yield path


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for item in node.elts for s in _strings(item)]
    return []


def _compared(path: Path, names: set[str], about: str | None = None) -> list[str]:
    """`x == "name"`, `x in ("name", ...)` and `case "name"` with a registered name (and, with `about`,
    only where the other side's source mentions it)."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literal = {s for side in sides for s in _strings(side)} & names
            other = " ".join(ast.get_source_segment(source, s) or "" for s in sides if not _strings(s))
            if literal and (about is None or about in other):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {sorted(literal)}")
        elif isinstance(node, ast.MatchValue) and set(_strings(node.value)) & names:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: case {_strings(node.value)}")
    return found


def test_stage_names_are_compared_nowhere_but_in_the_registry() -> None:
    names = set(REGISTRY) | {s.folder for s in REGISTRY.values() if s.folder}
    found = [hit for p in _files("mpr", skip=("mpr/orchestrate/stages.py",)) for hit in _compared(p, names)]
    assert not found, "compare with the StageSpec constants of mpr/orchestrate/stages.py:\n" + "\n".join(
        found
    )


def test_loss_names_appear_only_in_the_registry() -> None:
    found = []
    for path in _files("mpr", "pipeline", "train", skip=("train/losses/registry.py",)):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in LOSSES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "read train/losses/registry.py's LOSSES instead:\n" + "\n".join(found)


def test_backend_names_are_compared_nowhere_but_in_the_registry() -> None:
    names = set(BACKENDS) | {AUTO}
    found = [
        hit
        for p in _files("mpr", "pipeline", skip=("pipeline/llm/backends.py",))
        for about in ("backend", "kind")
        for hit in _compared(p, names, about)
    ]
    assert not found, "use pipeline/llm/backends.py's entries:\n" + "\n".join(found)


@pytest.mark.parametrize("spec", LOSSES.values(), ids=list(LOSSES))
def test_every_registered_loss_loads_and_takes_its_options(spec) -> None:
    """The class exists, and its constructor accepts every option its options model gives it."""
    import inspect

    cls = spec.load()
    accepted = {
        name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for name in inspect.signature(vars(klass)["__init__"]).parameters
    }
    assert set(spec.options().loss_kwargs()) <= accepted, (
        spec.name,
        set(spec.options().loss_kwargs()) - accepted,
    )
