"""The package's shape is a contract: no import cycle anywhere in it, and imports inside functions
only for the optional extras. The layers themselves are import-linter's contracts (pyproject.toml,
run by .ci/run as `lint-imports`); docs/ARCHITECTURE.md explains them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowmem_crosslora"
OPTIONAL = {"transformers", "peft", "gguf", "tokenizers", "ray"}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    out.append(comp)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_strongly_connected_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    comps = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    assert comps == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package() -> None:
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the test extra)")
    graph = grimp.build_graph("lowmem_crosslora")
    modules = {m for m in graph.modules if m != "lowmem_crosslora"}
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d in modules} for m in modules}
    cycles = [sorted(c) for c in strongly_connected(edges) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def function_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = [("." * inner.level) + (inner.module or "")]
                else:
                    continue
                found += [f"{path.name}:{inner.lineno} {n}" for n in names if n.split(".")[0] not in OPTIONAL]
    return found


def test_imports_inside_functions_are_only_for_the_optional_extras() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in function_level_imports(path)]
    assert not found, found


def test_only_the_cluster_runner_imports_ray() -> None:
    """Ray is the `[cluster]` extra: transfer and the core never import it, only migrate's Ray runner."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "ray" for n in names):
                found.append(str(path.relative_to(PACKAGE)))
    assert set(found) == {"migrate/cluster.py"}, found
