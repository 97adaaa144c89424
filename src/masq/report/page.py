"""The building blocks of the report page (:mod:`masq.report.html`): a table, a part, the
pipe tables of a Markdown file, and the figures copied next to the page."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

_PIPE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_RULE_ROW = re.compile(r"^\s*\|(\s*:?-{3,}:?\s*\|)+\s*$")


@dataclass
class Table:
    """A table to show: header cells, rows of cells (text), an optional caption."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Part:
    """One part of the report (module docstring): present or missing (then ``missing`` names
    the command that produces it)."""

    id: str
    title: str
    caption: str = ""
    command: str = ""
    missing: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, alt text)
    links: list[tuple[str, str]] = field(default_factory=list)  # (file name, label)
    text: list[str] = field(default_factory=list)  # pre-formatted blocks

    @property
    def present(self) -> bool:
        return bool(self.tables or self.figures or self.text)


def markdown_tables(text: str) -> tuple[list[str], list[Table]]:
    """The pipe tables of Markdown ``text`` as :class:`Table` (the line before each, when not
    blank, is its caption) and the other non-blank lines."""
    lines = text.splitlines()
    tables: list[Table] = []
    other: list[str] = []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and _PIPE_ROW.match(lines[i]) and _RULE_ROW.match(lines[i + 1]):
            header = _cells(lines[i])
            j = i + 2
            rows = []
            while j < len(lines) and _PIPE_ROW.match(lines[j]):
                rows.append(_cells(lines[j]))
                j += 1
            caption = ""
            back = i - 1
            while back >= 0 and not lines[back].strip():
                back -= 1
            if back >= 0 and other and other[-1] == lines[back].strip():
                caption = other.pop()
            tables.append(Table(header, rows, caption))
            i = j
            continue
        if lines[i].strip():
            other.append(lines[i].strip())
        i += 1
    return other, tables


def _cells(line: str) -> list[str]:
    """The cells of a pipe-table row; an escaped pipe (backslash-pipe) stays in its cell."""
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


class FigureSink(Protocol):
    """Where a part's figures and data files go, and the link the page uses for each."""

    def add(self, source: Path, prefix: str) -> str:
        """Make the existing file ``source`` reachable from the page; its link."""
        ...

    def draw(self, name: str) -> tuple[Path, str]:
        """Where to save a figure drawn for the page (named like ``name``), and its link."""
        ...


class Figures:
    """Copies figures next to the page under unique names (the ``masq report`` page)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.used: set[str] = set()

    def _unique(self, name: str) -> str:
        stem, n = name, 1
        while name in self.used:
            n += 1
            name = f"{Path(stem).stem}_{n}{Path(stem).suffix}"
        self.used.add(name)
        return name

    def add(self, source: Path, prefix: str) -> str:
        """Copy ``source`` next to the page as ``prefix_name``; the copy's name."""
        name = self._unique(f"{prefix}_{source.name}")
        shutil.copyfile(source, self.out / name)
        return name

    def draw(self, name: str) -> tuple[Path, str]:
        """A unique file next to the page for a figure drawn for it, and its name."""
        unique = self._unique(name)
        return self.out / unique, unique
