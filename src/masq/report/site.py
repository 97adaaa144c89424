"""The documentation site's generated content: markers in its Markdown pages replaced, at build
time, by what the committed datasets say, through the same code as ``masq report``.

A marker is an HTML comment on a line of its own (so a page without the build still reads as
Markdown); paths are relative to the site's ``docs/`` directory:

- ``<!-- masq:part KIND PATH... -->``: the part ``KIND`` of the report (:func:`masq.report.html.
  collect_parts`: ``diagonality``, ``compare``, ``lambda``, ``kfac``, ``peers``, ``settled``,
  ``bench``, ...) built from the analysis directories (or, for ``bench``, the benchmark files)
  ``PATH...``, its figures and data files linked where they lie;
- ``<!-- masq:include PATH -->``: a committed table or benchmark output: its pipe tables as
  tables, its other lines as a text block (a ``.md`` file is included as it is);
- ``<!-- masq:cli -->``: every command's ``--help``, as the installed ``masq`` prints it (the
  caller passes :func:`masq.cli.build_parser`'s parser: this module sits below the CLI).

A marker that names a missing file, or a part that has nothing to show, is an error
(:class:`DocsError`), so a broken dataset fails the build instead of leaving a hole.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
from pathlib import Path

from masq.errors import ConfigError
from masq.report.page import Part

MARKER = re.compile(r"^<!--\s*masq:(?P<kind>[a-z]+)(?P<args>[^>]*?)\s*-->\s*$", re.M)
_PIPE = re.compile(r"^\s*\|.*\|\s*$")
_RULE = re.compile(r"^\s*\|(\s*:?-{3,}:?\s*\|)+\s*$")


class DocsError(ConfigError):
    """A marker of the site that cannot be filled (names the page and the marker)."""


class LinkFigures:
    """A :class:`~masq.report.page.FigureSink` that copies nothing: each figure and data file is
    linked where it lies under ``docs/``, relative to the page's directory."""

    def __init__(self, page_dir: Path, docs_dir: Path) -> None:
        self.page_dir = page_dir.resolve()
        self.docs_dir = docs_dir.resolve()

    def add(self, source: Path, prefix: str) -> str:
        """The link from the page to ``source`` (which must lie under ``docs/``)."""
        path = source.resolve()
        if not path.is_relative_to(self.docs_dir):
            raise DocsError(f"{source}: outside the site's docs directory {self.docs_dir}")
        return Path(os.path.relpath(path, self.page_dir)).as_posix()

    def draw(self, name: str) -> tuple[Path, str]:
        """Refused: the site shows committed figures only."""
        raise DocsError(f"{name}: the site links committed figures only; draw it with masq report")


def render_part(part: Part, heading: str = "###") -> str:
    """``part`` as Markdown (the template ``part.md.j2`` that ``report.md`` uses), its title
    under ``heading``."""
    from masq.report.html import templates

    return str(templates().get_template("part.md.j2").render(part=part, heading=heading))


def include_text(text: str, *, markdown: bool) -> str:
    """A committed output as page content: Markdown as it is; otherwise each run of pipe-table
    rows as a table and each run of other non-blank lines as a text block."""
    if markdown:
        return text.strip() + "\n"
    blocks: list[tuple[bool, list[str]]] = []
    for line in text.splitlines():
        if not line.strip():
            if blocks and blocks[-1][1] and blocks[-1][1][-1] != "":
                blocks[-1][1].append("")
            continue
        table = bool(_PIPE.match(line))
        if not blocks or blocks[-1][0] != table:
            blocks.append((table, []))
        blocks[-1][1].append(line)
    out = []
    for table, lines in blocks:
        body = "\n".join(_escape_cell_pipes(lines) if table else lines).strip("\n")
        out.append(body if table else f"```text\n{body}\n```")
    return "\n\n".join(out) + "\n"


def _escape_cell_pipes(rows: list[str]) -> list[str]:
    """Rows of a fixed-width pipe table with a pipe inside a cell (e.g. a header "off |.| sum")
    escaped: the rule row's pipes say where the columns are, so a row of the same width with
    more pipes is cut at those positions and its other pipes become ``\\|``."""
    rule = next((r for r in rows if _RULE.match(r)), None)
    if rule is None:
        return rows
    cuts = [i for i, c in enumerate(rule) if c == "|"]
    out = []
    for row in rows:
        if len(row) != len(rule) or row.count("|") == len(cuts):
            out.append(row)
            continue
        cells = [row[a + 1 : b].replace("|", "\\|") for a, b in itertools.pairwise(cuts)]
        out.append("|" + "|".join(cells) + "|")
    return out


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """``masq --help`` and every command's ``--help`` (and each ``analyze`` sub-command's), as
    ``parser`` (:func:`masq.cli.build_parser`) prints them, one section per command."""
    sections = []

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    cmd = [*words, name]
                    text = sub.format_help().rstrip()
                    sections.append(f"### masq {' '.join(cmd)}\n\n```text\n{text}\n```\n")
                    walk(sub, cmd)

    os.environ.setdefault("COLUMNS", "100")  # argparse wraps at the terminal's width
    sections.append(f"### masq\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    walk(parser, [])
    return "\n".join(sections)


_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([^<]*)</code>")


def link_roles(html: str) -> str:
    """The Sphinx roles the docstrings use (``:func:`masq.x.f```), as mkdocstrings renders them
    (the role's name, then the target as code), turned into links of the API reference: a
    dotted ``masq.`` target becomes an optional cross-reference resolved by mkdocs-autorefs
    (shown as its last part after ``~``, else in full); any other target stays as code."""

    def link(match: re.Match[str]) -> str:
        tilde, target = match[1], match[2]
        shown = target.rsplit(".", 1)[-1] if tilde else target
        if target.startswith("masq.") and re.fullmatch(r"[\w.]+", target):
            return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'
        return f"<code>{shown}</code>"

    return _ROLE.sub(link, html)


def expand(
    markdown: str, page: Path, docs_dir: Path, parser: argparse.ArgumentParser | None = None
) -> str:
    """``markdown`` (the page ``page``) with every marker (module docstring) replaced; the
    ``masq:cli`` marker needs the command line's ``parser``."""
    from masq.report.html import collect_parts

    def fill(match: re.Match[str]) -> str:
        kind, args = match["kind"], shlex.split(match["args"])
        where = f"{page.name}: <!-- masq:{kind} {' '.join(args)} -->"
        paths = [docs_dir / a for a in (args[1:] if kind == "part" else args)]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DocsError(f"{where}: {', '.join(missing)} does not exist")
        if kind == "include" and len(args) == 1:
            text = paths[0].read_text(encoding="utf-8")
            return include_text(text, markdown=paths[0].suffix == ".md")
        if kind == "cli" and not args:
            if parser is None:
                raise DocsError(f"{where}: give expand the command line's parser")
            return cli_reference(parser)
        if kind == "part" and len(args) >= 2:
            figs = LinkFigures(page.parent, docs_dir)
            name = args[0]
            bench = paths if name == "bench" else []
            results = [] if name == "bench" else paths
            parts = [p for p in collect_parts(results, figs, bench=bench) if p.id == name]
            if not parts:
                raise DocsError(f"{where}: no report part {name!r}")
            if not parts[0].present:
                raise DocsError(f"{where}: the part has nothing to show ({parts[0].missing})")
            return render_part(parts[0])
        raise DocsError(
            f"{where}: not a marker; use masq:part KIND PATH..., masq:include PATH or masq:cli"
        )

    return MARKER.sub(fill, markdown)
