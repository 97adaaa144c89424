"""The house rules: one direction of imports, no module much over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "masq"
# Rooms in the direction of imports: a module may import only rooms at or before its own.
ORDER: tuple[str, ...] = (
    "errors",
    "fileio",
    "slt",
    "registry",
    "plugins",  # imports the user's modules by name (they register into the registries)
    "choices",
    "architecture",  # an MLP's layer sizes and parameter count
    "config",
    "defaults",
    "streams",
    "curves",
    "data",
    "tasks",
    "scenarios",
    "models",
    "runtime",
    "importance",
    "consolidation",
    "training",
    "stacked",
    "protocol",
    "runid",
    "store",
    "migrate",  # masq 0.1 results dirs converted to the store's format
    "archive",
    "grid",
    "analysis",
    "report",
    "cli",
)
MAX_LINES = 520


def room(module: str) -> str:
    """``masq.grid.plan`` -> ``grid``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def imported(path: Path) -> set[str]:
    """Every masq module named by an import statement of ``path`` (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("masq"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("masq"))
    return names


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda v: str(v))
def test_imports_point_down_only(module: str, path: Path) -> None:
    own = room(module)
    if own in ("", "__main__"):
        return
    assert own in ORDER, f"{module}: add its room to ORDER"
    upward = [
        name
        for name in imported(path)
        if room(name) in ORDER and ORDER.index(room(name)) > ORDER.index(own)
    ]
    assert not upward, f"{module} imports upward: {sorted(upward)}"


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda v: str(v))
def test_no_module_much_over_500_lines(module: str, path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it along its seams"


def import_graph() -> dict[str, set[str]]:
    """{module: the masq modules it imports} (deferred imports included; ``from a.b import c``
    counts as an import of ``a.b.c`` when that is a module, else of ``a.b``)."""
    known = {name for name, _ in modules()}

    def resolve(target: str) -> str:
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    graph: dict[str, set[str]] = {}
    for name, path in modules():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("masq"):
                # `from pkg import submodule` imports the submodule; `from pkg import name`
                # imports pkg (its __init__)
                targets |= {resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("masq")}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_anywhere_not_even_inside_a_package() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
