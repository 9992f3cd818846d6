"""No import cycles in l2p_fast: the module graph, function-level imports included, is acyclic.

Edges come from every ``import`` / ``from … import`` statement anywhere in a module (also inside
functions), resolved to modules of the package: ``from . import x`` is an edge to the submodule ``x``
when it exists, else to the package. A package's ``__init__`` is the package node itself. The
top-level ``kernels/`` folder is the package's ``l2p_fast.kernels``; the compiled extension
``l2p_fast._C`` is a leaf.
"""

from __future__ import annotations

import ast
from pathlib import Path

import l2p_fast

ROOT = Path(l2p_fast.__file__).parent
KERNELS = ROOT.parent / "kernels"  # installed as l2p_fast.kernels (setuptools package_dir)


def _module_name(path: Path, root: Path, prefix: tuple[str, ...]) -> str:
    parts = (*prefix, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path | None]:
    modules: dict[str, Path | None] = {_module_name(p, ROOT.parent, ()): p for p in ROOT.rglob("*.py")}
    if KERNELS.is_dir():
        modules.update({_module_name(p, KERNELS, ("l2p_fast", "kernels")): p for p in KERNELS.glob("*.py")})
    modules["l2p_fast._C"] = None  # the compiled extension (built or not): a leaf
    return modules


def _edges(name: str, path: Path | None, modules: dict[str, Path | None]) -> set[str]:
    if path is None:
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports (anywhere in its body)."""
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, …, a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_package_import_graph_is_acyclic() -> None:
    graph = import_graph()
    assert "l2p_fast.ops.pool" in graph and "l2p_fast.dispatch" in graph["l2p_fast.ops.pool"]
    assert "l2p_fast.continual.benchmarks.files" in graph["l2p_fast.continual.benchmarks.vision"]  # subpackages too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_count() -> None:
    """The scan sees imports inside functions (the kernels are imported lazily by the launchers)."""
    graph = import_graph()
    assert "l2p_fast.kernels.pool_forward" in graph["l2p_fast.ops.triton_launch"]


def test_the_checker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
