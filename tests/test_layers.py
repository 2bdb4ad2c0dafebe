"""The package's import graph: no cycle, and layers import downward only (DESIGN.md "Layers").

The graph is read from the source with ``ast`` — every ``import`` statement, function-level and
``TYPE_CHECKING`` ones included — so a cycle hidden inside a function fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "reloop"

#: Layer of each module prefix (longest prefix wins): a module may import only from its own layer or below.
LAYERS: dict[str, int] = {
    "reloop.errors": 0,
    "reloop.registry": 0,
    "reloop.device": 1,
    "reloop.distributed": 1,
    "reloop.data": 2,
    "reloop.models": 3,
    "reloop.threads": 3,
    "reloop.update": 4,
    "reloop.memory": 4,
    "reloop.combine": 4,
    "reloop.components": 5,
    "reloop.config": 6,
    "reloop.engine": 7,
    "reloop.preflight": 7,
    "reloop.protocol": 8,
    "reloop.checks": 9,
    "reloop.bench": 9,
    "reloop.serve": 9,
    "reloop.api": 10,
    "reloop.init_config": 10,
    "reloop.cli": 11,
    "reloop": 12,  # the package's __init__: the public API re-exports
}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (SRC / PKG).rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line} over every import statement in the module's source."""
    mods = _modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):  # a package importing its own submodules is fine
                    edges[m].setdefault(n, node.lineno)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(module)
    return LAYERS[best]


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_detection_finds_a_planted_cycle():
    """The checker itself can fail: a two-module loop and a three-module loop are both reported."""
    edges = {"a": {"b": 1}, "b": {"a": 1}, "c": {"d": 1}, "d": {"e": 1}, "e": {"c": 1}, "f": {}}
    assert cycles(edges) == [["a", "b"], ["c", "d", "e"]]


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if not any(m == p or m.startswith(p + ".") for p in LAYERS)]
    assert not missing, f"add these modules to LAYERS in tests/test_layers.py: {missing}"


def test_layers_import_downward_only():
    upward = []
    for m, targets in import_graph().items():
        for n, line in targets.items():
            if layer_of(n) > layer_of(m):
                upward.append(f"{m}:{line} imports {n} (layer {layer_of(m)} -> {layer_of(n)})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("planted", [("reloop.models.base", "reloop.config")])
def test_layer_check_catches_an_upward_import(planted):
    low, high = planted
    assert layer_of(high) > layer_of(low)
