"""The package layout: imports only point down the layers, and no package imports a package above it.

Every ``import`` and ``from ... import`` in ``retain/`` counts, also those inside functions, so a
function-level import cannot hide a cycle.
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
    {"config"},
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
    """``retain.*`` module -> the ``retain.*`` modules it imports (anywhere in the file)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("retain"):
                edges[module].add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                pytest.fail(f"{path}: relative import; use absolute 'retain.' imports")
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name.startswith("retain"))
    return edges


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
