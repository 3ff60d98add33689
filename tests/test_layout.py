"""The folder layout follows the data flow: imports point down it (docs/architecture.md).

Every import statement of every module counts, the ones inside functions too (a local import
hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml's package-dir)
ROOTS = {"msaflow": "msaflow", "pipeline": "msaflow.pipeline", "extractors": "msaflow.extractors",
         "model": "msaflow.model", "datasets": "msaflow.datasets"}
# a layer may import itself, the shared helpers in msaflow/ and the layers named here
ALLOWED = {
    "msaflow.datasets": {"msaflow.extractors"},  # `msaflow segment` recognises speech
    "msaflow.extractors": set(),
    "msaflow.model": {"msaflow.extractors"},  # text encoders and front-ends
    "msaflow.pipeline": {"msaflow.datasets", "msaflow.extractors", "msaflow.model"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [ROOTS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    return ".".join(p for p in parts if p != "__init__")


def modules() -> dict[str, Path]:
    found = {}
    for folder in ROOTS:
        for path in (REPO / folder).rglob("*.py"):
            if "demo" not in path.relative_to(REPO).parts:
                found[module_name(path)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The msaflow modules `path` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("msaflow"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("msaflow")}
    return {m for m in out if m in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    # a package's __init__ is imported with each of its modules: only edges to modules count
    return {name: imports(path, set(found)) - {name, "msaflow"} for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_local_imports_and_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # a function-local import is an edge too
    assert "msaflow.tario" in imports(REPO / "extractors" / "clip.py", set(modules()))


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def layer(name: str) -> str | None:
    for top in ALLOWED:
        if name == top or name.startswith(top + "."):
            return top
    return None  # the shared helpers in msaflow/ (and the package root)


def test_imports_point_down_the_data_flow(graph):
    wrong = [f"{a} -> {b}" for a, deps in graph.items() for b in deps
             if layer(a) and layer(b) and layer(b) != layer(a) and layer(b) not in ALLOWED[layer(a)]]
    assert wrong == []


def test_shared_helpers_import_no_layer(graph):
    shared = {name: deps for name, deps in graph.items() if layer(name) is None and name != "msaflow"}
    assert shared, "msaflow/ holds the shared helpers"
    assert {name: sorted(d for d in deps if layer(d)) for name, deps in shared.items()} == \
        {name: [] for name in shared}
