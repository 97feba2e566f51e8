"""No import cycles between lorafleet modules: objects are wired at assembly, never patched after
the fact.

Every import counts, at module level or inside a function (a function-level import that closes a
cycle is a cycle in hiding), and importing `a.b.c` from outside package `a.b` also runs
`a/b/__init__.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.modules import lorafleet_modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, source: Path, modules: set[str]) -> set[str]:
    """The lorafleet modules that importing `name` executes directly."""
    is_package = source.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importer's package
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    edges = set()
    own = set(_ancestors(name)) | {name}
    for target in targets:
        if target not in modules:
            continue
        edges.add(target)
        # a foreign package's __init__
        edges |= {parent for parent in _ancestors(target) if parent not in own}
    edges.discard(name)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = lorafleet_modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycles_between_lorafleet_modules():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_cycles_through_a_package_init():
    graph = {"p": {"p.a"}, "p.a": set(), "q": {"p.a"}, "p.b": {"q"}}
    assert _cycles(graph) == []
    graph["p.a"] = {"q"}  # p.a -> q -> p.a
    assert _cycles(graph) == [["p.a", "q"]]


def test_the_gateway_does_not_import_the_trainer():
    graph = import_graph()
    reached, todo = set(), ["lorafleet.serve.api.app"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert not {m for m in reached if m.startswith("lorafleet.train")}, sorted(reached)
