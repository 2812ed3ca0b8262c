"""The package layout: imports only point down the layers, no package imports a package above it,
and no module imports itself back through other modules.

Every ``import`` and ``from ... import`` in ``retain/`` counts, also those inside functions (and under
``TYPE_CHECKING``), so a function-level import cannot hide a cycle. The plugin modules a registry imports
by name (``retain.registry``) are not edges: that happens on the registry's first read, not while the
module that holds the registry loads, so plugins may import that module.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retain"

#: Lower layers first. A module may import from its own layer's package and from any earlier layer.
LAYERS: list[set[str]] = [
    {"errors"},
    {"io"},
    {"io_lock"},
    {"config"},
    {"registry"},
    {"data"},
    {"models"},
    {"losses", "stats"},
    {"results"},
    {"eval"},
    {"strategies"},
    {"train"},
    {"report"},
    {"scenarios"},
    {"guide"},
    {"integrations"},
    {"cli"},
    {"__init__", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """``retain.*`` module -> the ``retain.*`` modules it imports (anywhere in the file).

    ``from retain.x import y`` points at the module ``retain.x.y`` when there is one, else at ``retain.x``.
    """
    paths = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("retain"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    edges[module].add(submodule if submodule in paths else node.module)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                pytest.fail(f"{path}: relative import; use absolute 'retain.' imports")
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name.startswith("retain"))
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of ``graph``, sorted; self-edges ignored.

    Tarjan's algorithm finds the groups; a breadth-first search inside each group gives its shortest
    cycle through the group's first node, which is what a failure message needs to name.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for group in groups:
        start = min(group)
        came_from: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in came_from:
            following = []
            for node in frontier:
                for nxt in sorted(graph.get(node, set()) & group):
                    if nxt not in came_from and nxt != node:
                        came_from[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in PACKAGE.glob("*.py")}
    assert packages - set(RANK) == set(), "add new top-level packages/modules to LAYERS"


def test_imports_only_point_down():
    violations = []
    for module, targets in _imports().items():
        source = _package_of(module)
        for target in targets:
            destination = _package_of(target)
            if destination in ("__init__",) and target == "retain":
                destination = "__init__"
            if RANK[destination] > RANK[source] or (RANK[destination] == RANK[source] and destination != source):
                violations.append(f"{module} -> {target}")
    assert not violations, "imports that point up (or sideways) the layers:\n" + "\n".join(sorted(violations))


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in _imports().items():
        for target in targets:
            a, b = _package_of(module), _package_of(target)
            if a != b:
                graph[a].add(b)
    seen: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        seen[node] = 1
        for nxt in graph[node]:
            if seen.get(nxt) == 1:
                pytest.fail("package import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in seen:
                visit(nxt, trail + [node])
        seen[node] = 2

    for node in list(graph):
        if node not in seen:
            visit(node, [])


def test_no_cycle_between_modules():
    """Module-level cycles too, not only between packages: inside a package, a module that imports one
    that imports it back only works in some import orders (a partly initialised module)."""
    graph = {module: {t for t in targets if t != module} for module, targets in _imports().items()}
    cycles = _cycles(graph)
    assert not cycles, "module import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_cycle_finder_names_each_cycle_once():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"d", "e"}, "e": set(), "x": {"y"}, "y": {"x"}}
    assert _cycles(graph) == [["a", "b", "a"], ["x", "y", "x"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
