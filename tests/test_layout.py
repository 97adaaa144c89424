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
    "config",
    "curves",
    "data",
    "tasks",
    "models",
    "runtime",
    "importance",
    "consolidation",
    "training",
    "stacked",
    "protocol",
    "runid",
    "store",
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
