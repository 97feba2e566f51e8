"""The import graph of the lorafleet namespace: no cycles (objects are wired at assembly, never
patched after the fact), and the layers only ever import downwards:

- `lorafleet.adapters` and `lorafleet.train` never import `lorafleet.serve`;
- the gateway never imports the trainer;
- inside `serve/`, only the HTTP layer itself (`serve.api`) and the entry points (`serve.cli`,
  `serve.dev`) import `serve.api`: domain packages (engine, fleet, rollouts, drift, feedback) and
  the gateway's other modules share values through `serve.types` instead;
- the console only talks HTTP: nothing it imports reaches the catalog, a store, the engine or the
  gateway's parts.

Every import counts, at module level or inside a function (a function-level import that closes a
cycle is a cycle in hiding), and importing `a.b.c` from outside package `a.b` also runs
`a/b/__init__.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Each lorafleet module and the lorafleet modules importing it executes directly."""
    modules = lorafleet_modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycles_between_lorafleet_modules(graph: dict[str, set[str]]):
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_cycles_through_a_package_init():
    graph = {"p": {"p.a"}, "p.a": set(), "q": {"p.a"}, "p.b": {"q"}}
    assert _cycles(graph) == []
    graph["p.a"] = {"q"}  # p.a -> q -> p.a
    assert _cycles(graph) == [["p.a", "q"]]


def _reached(graph: dict[str, set[str]], start: list[str]) -> set[str]:
    """Every module that importing `start` executes."""
    reached, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    return reached


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _imports_of(graph: dict[str, set[str]], importers: list[str], *packages: str) -> list[str]:
    """`importer -> imported` for each direct import of a module of `packages`."""
    return sorted(f"{m} -> {t}" for m in importers for t in graph[m] if _in(t, *packages))


def test_the_gateway_does_not_import_the_trainer(graph: dict[str, set[str]]):
    reached = _reached(graph, ["lorafleet.serve.api.app"])
    assert not {m for m in reached if _in(m, "lorafleet.train")}, sorted(reached)


def test_the_registry_and_the_trainer_never_import_the_gateway(graph: dict[str, set[str]]):
    lower = [m for m in graph if _in(m, "lorafleet.adapters", "lorafleet.train")]
    lower += ["lorafleet", "lorafleet.errors", "lorafleet.chat_jsonl", "lorafleet.scoring"]
    assert not _imports_of(graph, lower, "lorafleet.serve")


def test_only_the_http_layer_and_the_entry_points_import_it(graph: dict[str, set[str]]):
    entry = ("lorafleet.serve.api", "lorafleet.serve.cli", "lorafleet.serve.dev")
    others = [m for m in graph if not _in(m, *entry)]
    assert len(others) > 50
    assert not _imports_of(graph, others, "lorafleet.serve.api")


def test_the_console_only_talks_http(graph: dict[str, set[str]]):
    console = [m for m in graph if _in(m, "lorafleet.serve.console")]
    stateful = (
        "lorafleet.adapters",
        "lorafleet.serve.api",
        "lorafleet.serve.engine",
        "lorafleet.serve.fleet",
        "lorafleet.serve.gateway",
        "lorafleet.train",
    )
    reached = _reached(graph, console)
    assert {m for m in reached if _in(m, "lorafleet.serve.settings")}  # the graph is read
    assert not sorted(m for m in reached if _in(m, *stateful))


def test_the_layer_checks_see_a_forbidden_import():
    graph = {"lorafleet.adapters.x": {"lorafleet.serve.types"}, "lorafleet.serve.types": set()}
    assert _imports_of(graph, ["lorafleet.adapters.x"], "lorafleet.serve") == [
        "lorafleet.adapters.x -> lorafleet.serve.types"
    ]
    assert _imports_of(graph, ["lorafleet.adapters.x"], "lorafleet.serve.api") == []
