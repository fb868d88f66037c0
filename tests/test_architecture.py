"""The house rules of docs/architecture.md, read from the imports themselves (lazy ones included): imports run
downward only, and no two modules import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("configs", "training", "composition", "flows")
LAYERS = [
    "configs",
    "training.storage",
    "training.device",
    "training.step",
    "training.reference",
    "training",
    "training.analysis",
    "composition",
    "flows",
]
"""Lowest first; a module may import its own layer and those below it. ``training`` is the base model's room:
the modules directly in ``training/`` that no other entry names."""

DOCUMENTED_EXCEPTIONS = {("composition.pipeline", "flows.registry")}
"""The library's front door resolves ``NAME@ALIAS`` specs through the registry, lazily
(docs/architecture.md)."""


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _layer(module: str) -> int:
    """The index in :data:`LAYERS` of the longest entry that is ``module`` or a package holding it."""
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    assert matches, f"{module} is in no layer"
    return LAYERS.index(max(matches, key=len))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_imports_run_downward_only(graph):
    upward = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module) and (module, target) not in DOCUMENTED_EXCEPTIONS
    ]
    assert not upward, upward


def test_no_import_cycles(graph):
    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    return path + [start]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
        return None

    cycles = {" -> ".join(cycle) for module in graph if (cycle := cycle_from(module))}
    assert not cycles, sorted(cycles)
