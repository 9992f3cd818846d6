"""No import cycles inside ``l2p_fast.continual``, counting imports written inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import l2p_fast.continual

ROOT = Path(l2p_fast.continual.__file__).parent
PACKAGE = "l2p_fast.continual"


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((PACKAGE, *parts))] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of this package it imports anywhere in its file (``from . import x`` → ``x``)."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                subs = {f"{target}.{a.name}" for a in node.names} & modules.keys()
                targets |= subs if len(subs) == len(node.names) else subs | {target}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_scanner_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_continual():
    graph = import_graph()
    assert f"{PACKAGE}.benchmarks.files" in graph[f"{PACKAGE}.benchmarks.vision"]  # the scan sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
