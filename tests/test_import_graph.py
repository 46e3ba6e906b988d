"""The import graph of ``fluid_app/`` and ``backends/`` has no cycle.

Every import counts, at module level or inside a function (a lazy import still knots two
modules together); only imports under ``if TYPE_CHECKING:`` are left out, since they never
run. A cycle is reported with its modules in order.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("fluid_app", "backends")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """Project modules that module ``name`` imports: ``from pkg import mod`` counts as ``pkg.mod``
    when ``mod`` is a module, else as ``pkg``; ``from . import x`` resolves against ``name``."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            visit(child)

    visit(ast.parse(source))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p.read_text(encoding="utf-8"), module_name(p), p.name == "__init__.py",
                                             modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_project():
    graph = import_graph()
    assert len(graph) > 40 and graph["fluid_app.api"], "the scan found no modules: a broken test"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles_and_lazy_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n"
              "def f():\n    from y import z\n    from . import w\n")
    # a lazy import inside a function is an edge; one under TYPE_CHECKING is not
    assert imported_modules(source, "p.mod", False, {"x", "y", "y.z", "p", "p.w"}) == {"y.z", "p.w"}
    # the knot the MLX backend once had: loader imports lora at the top, lora imports loader lazily
    loader, lora = "from .lora import fuse\n", "def fuse():\n    from .loader import names\n"
    modules = {"b.loader", "b.lora"}
    graph = {"b.loader": imported_modules(loader, "b.loader", False, modules),
             "b.lora": imported_modules(lora, "b.lora", False, modules)}
    assert find_cycle(graph) == ["b.loader", "b.lora", "b.loader"]


def test_the_core_does_not_reach_into_backend_modules():
    """fluid_app/ goes through ``backends``' own entry points, never a backend's modules."""
    graph = import_graph()
    reaching = sorted((a, b) for a, targets in graph.items() if a.startswith("fluid_app")
                      for b in targets if b.startswith("backends."))
    assert reaching == []
