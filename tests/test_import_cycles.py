"""No import cycles inside the montessori package: module-level and function-level imports alike.

A function-level import hides a cycle from Python (it runs after both modules loaded) but not from
the reader: the two modules still depend on each other. Read from the source with ast, nothing imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import montessori

ROOT = Path(montessori.__file__).parent

# Cycles allowed, each with its reason (none today).
ALLOWED: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = ("montessori",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: montessori modules it imports anywhere in its source}."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from a.b import c` imports the module a.b.c if there is one, else names of a.b
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # the engine imports fast.py inside _fast_linear only; `from montessori.influence import core` is the module
    assert "montessori.influence.fast" in graph["montessori.influence.engine"]
    assert "montessori.executors.launcher" in graph["montessori.pipeline"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycles_in_the_package():
    found = [c for c in cycles(import_graph()) if c not in ALLOWED]
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_only_the_runner_imports_the_executors():
    """Executors import stages, never the reverse: a stage does not know where it runs."""
    graph = import_graph()
    importers = {m for m, targets in graph.items() if not m.startswith("montessori.executors")
                 and any(t.startswith("montessori.executors") for t in targets)}
    assert importers == {"montessori.pipeline"}
