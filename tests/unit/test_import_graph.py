"""The package's import graph has no circle, and the layers only import downwards.

Built from the source with ``ast``: every ``import`` / ``from … import`` of a gastune module,
at module level or inside a function (a lazy import still ties the modules together). A
module's own package ``__init__`` is not an edge: Python runs it first whatever the module
imports.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Each package may import only from packages listed before it (and from itself).
LAYERS = [
    {"errors"},
    {"provenance", "yaml_file"},
    {"selection"},
    {"models"},
    {"tuners"},
    {"engine"},
    {"methods"},
    {"data"},
    {"training"},
    {"eval"},
    {"viz"},
    {"experiments"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (SRC / "gastune").rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                resolved = _resolve(target, modules) if target.startswith("gastune") else None
                if resolved and resolved != name and not name.startswith(resolved + "."):
                    edges.add(resolved)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_layers_only_import_downwards():
    rank = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    upward = []
    for module, edges in import_graph().items():
        source = _top(module)
        if source not in rank:
            continue
        for target in edges:
            dest = _top(target)
            if dest in rank and dest != source and rank[dest] >= rank[source]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_every_package_is_placed_in_a_layer():
    packages = {_top(m) for m in import_graph() if _top(m)}
    placed = set().union(*LAYERS)
    assert packages <= placed, f"place {sorted(packages - placed)} in LAYERS"


def test_methods_never_import_the_trainer_side():
    offenders = [
        f"{m} -> {t}"
        for m, edges in import_graph().items()
        if m.startswith("gastune.methods")
        for t in edges
        if t.startswith("gastune.training")
    ]
    assert offenders == []


@pytest.mark.parametrize("module", ["gastune.methods", "gastune.methods.dataselect", "gastune.training"])
def test_imports_alone_in_a_fresh_interpreter(module):
    assert importlib.util.find_spec(module) is not None
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_old_paths_are_the_moved_modules():
    import gastune.training.ist
    from gastune.training.methods import GastMethod, register_method

    import gastune.methods.ist
    from gastune.methods import GastMethod as moved

    assert gastune.training.ist is gastune.methods.ist
    assert GastMethod is moved
    assert callable(register_method)
