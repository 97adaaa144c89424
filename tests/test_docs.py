"""The documentation site (mkdocs.yml, docs/) and the README: the markers that fill the results
pages from the committed datasets (masq.report.site), the API reference's docstrings, the nav,
and the README's headline table against the dataset it comes from. ``make test`` builds the
site itself with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from masq.cli import build_parser
from masq.report.site import DocsError, LinkFigures, expand, include_text, link_roles

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
MKDOCS = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def api_modules() -> list[str]:
    """The modules the API reference pages render (``::: module`` lines)."""
    found = []
    for page in sorted((DOCS / "reference" / "api").glob("*.md")):
        found += re.findall(r"^::: (\S+)", page.read_text(encoding="utf-8"), re.M)
    return found


# ----------------------------------------------------------------------------- markers


def test_include_keeps_tables_and_fences_the_other_lines() -> None:
    text = "header line\n\n| a | b |\n|---|---|\n| 1 | 2 |\nreal 1m2s\n"
    out = include_text(text, markdown=False)
    table = "| a | b |\n|---|---|\n| 1 | 2 |"
    assert out == f"```text\nheader line\n```\n\n{table}\n\n```text\nreal 1m2s\n```\n"
    assert include_text("# T\n\n| a |\n|---|\n", markdown=True) == "# T\n\n| a |\n|---|\n"


def test_a_pipe_inside_a_fixed_width_cell_is_escaped() -> None:
    rows = [
        "| x | off |.| sum |",
        "|---|-------------|",
        "| 1 |       6754  |",
    ]
    out = include_text("\n".join(rows), markdown=False).splitlines()
    assert out[0] == "| x | off \\|.\\| sum |" and out[1:] == rows[1:]


def test_a_part_marker_renders_the_report_part_with_links_to_the_committed_files() -> None:
    page = DOCS / "results" / "diagonality.md"
    out = expand("a\n<!-- masq:part kfac kfac/split -->\nb\n", page, DOCS)
    assert out.startswith("a\n### ") and out.rstrip().endswith("b")
    assert "| diagonal FIM |" in out and "K-FAC" in out
    links = re.findall(r"\]\(([^)]+)\)", out)
    assert links and all((page.parent / link).resolve().is_file() for link in links), links
    assert any(link.endswith("kfac_lambda.png") for link in links)


def test_include_and_cli_markers() -> None:
    page = DOCS / "results" / "table1.md"
    out = expand("<!-- masq:include table1/paired.md -->\n", page, DOCS)
    assert out == (DOCS / "table1" / "paired.md").read_text(encoding="utf-8").strip() + "\n"
    cli = expand("<!-- masq:cli -->\n", page, DOCS, build_parser())
    assert "### masq grid\n" in cli and "usage: masq grid" in cli
    assert "### masq analyze kfac\n" in cli and "--blocks-window" in cli


@pytest.mark.parametrize(
    ("marker", "needle"),
    [
        ("<!-- masq:include table1/nothing.md -->", "does not exist"),
        ("<!-- masq:part kfac table1 -->", "nothing to show"),
        ("<!-- masq:part nope kfac/split -->", "no report part 'nope'"),
        ("<!-- masq:frobnicate -->", "not a marker"),
        ("<!-- masq:cli -->", "parser"),
    ],
)
def test_a_marker_that_cannot_be_filled_is_a_one_line_error(marker: str, needle: str) -> None:
    with pytest.raises(DocsError) as err:
        expand(marker + "\n", DOCS / "index.md", DOCS)
    message = str(err.value)
    assert needle in message and "index.md" in message and "\n" not in message


def test_link_figures_refuses_what_the_site_cannot_serve(tmp_path: Path) -> None:
    figs = LinkFigures(DOCS / "results", DOCS)
    assert figs.add(DOCS / "kfac" / "split" / "kfac.png", "x") == "../kfac/split/kfac.png"
    with pytest.raises(DocsError, match="outside the site's docs directory"):
        figs.add(tmp_path / "a.png", "x")
    with pytest.raises(DocsError, match="committed figures only"):
        figs.draw("accuracy.png")


def test_docstring_roles_become_cross_references_or_code() -> None:
    html = (
        "see :func:<code>~masq.store.load</code>, :mod:<code>masq.importance</code>, "
        ":class:<code>Method</code> and :data:<code>x[0]</code>"
    )
    assert link_roles(html) == (
        'see <autoref identifier="masq.store.load" optional><code>load</code></autoref>, '
        '<autoref identifier="masq.importance" optional><code>masq.importance</code></autoref>, '
        "<code>Method</code> and <code>x[0]</code>"
    )


# ----------------------------------------------------------------------------- the site


def test_every_page_is_in_the_nav() -> None:
    """Every hand-written page (not the analyses' own outputs) is reachable from the nav."""
    pages = [DOCS / "index.md", DOCS / "quickstart.md", DOCS / "paper.md"]
    for folder in ("concepts", "howto", "results", "reference"):
        pages += sorted((DOCS / folder).rglob("*.md"))
    nav = set(re.findall(r"([\w/.-]+\.md)\s*$", MKDOCS, re.M))
    missing = [str(p.relative_to(DOCS)) for p in pages if str(p.relative_to(DOCS)) not in nav]
    assert not missing, missing


def test_snippets_name_existing_files() -> None:
    """Every ``--8<--`` include of a page is intact (a Python fence would let ruff's Markdown
    formatting rewrite it to ``--8 < --``) and names a file of the repository."""
    for page in DOCS.rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        assert "--8 <" not in text, page
        for path in re.findall(r'^\s*--8<-- "([^"]+)"', text, re.M):
            assert (ROOT / path).is_file(), (page, path)


def test_the_api_reference_has_a_docstring_for_every_public_name() -> None:
    """mkdocstrings renders what the docstrings say: every module of the API pages, and every
    public function, class and method defined there (inherited docstrings count), has one."""
    missing = []
    for name in api_modules():
        module = importlib.import_module(name)
        if not module.__doc__:
            missing.append(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) and not obj.__doc__:
                missing.append(f"{name}.{attr}")
            if inspect.isclass(obj):
                if not obj.__doc__:
                    missing.append(f"{name}.{attr}")
                for method, fn in vars(obj).items():
                    if method.startswith("_") or not inspect.isfunction(fn):
                        continue
                    if not inspect.getdoc(getattr(obj, method)):
                        missing.append(f"{name}.{attr}.{method}")
    assert len(api_modules()) >= 40
    assert not missing, missing


# ----------------------------------------------------------------------------- the README


def test_the_readme_is_short_and_its_links_resolve() -> None:
    assert len(README.splitlines()) < 220
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", README):
        assert (ROOT / link).is_file(), link


def _cells(path: Path, *keys: str) -> list[str]:
    """The cells of the one row of the pipe table in ``path`` whose leading cells are ``keys``."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("|")
    ]
    (row,) = [r for r in rows if tuple(r[: len(keys)]) == keys]
    return row


def test_the_readme_headline_table_is_the_settled_dataset() -> None:
    """Each row of the README's headline table equals the committed gain.md (EWC and the tuned
    no-EWC baseline) and paired.md (MaSQ − FIM) rows it was taken from."""
    start = README.index("| SLT | no EWC, ε2 tuned |")
    lines = README[start:].split("\n\n")[0].splitlines()[2:]
    assert len(lines) == 3
    for line in lines:
        slt, no_ewc, fim, masq, diff = (c.strip() for c in line.strip().strip("|").split("|"))
        fim_row = _cells(DOCS / "table1" / "gain.md", "test", slt, "last", "torch", "FIM")
        masq_row = _cells(DOCS / "table1" / "gain.md", "test", slt, "last", "torch", "MaSQ")
        assert no_ewc == fim_row[9].split(" ±")[0] == masq_row[9].split(" ±")[0]
        assert fim == f"{fim_row[7]} ({fim_row[6]})" and masq == f"{masq_row[7]} ({masq_row[6]})"
        paired = _cells(DOCS / "table1" / "paired.md", "test", slt, "last", "torch")
        assert diff == f"{paired[5]} [{paired[6]}, {paired[7]}]"


def test_the_readme_peer_tables_are_the_committed_tables() -> None:
    """Every row of the README's peer tables is a row of the committed table it was taken
    from (docs/peers/<preset>/peers.md), word for word: the README shows no number that the
    committed records do not give."""
    start = README.index("## The field's reference tables")
    section = README[start:].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    tables = {p.parent.name: p.read_text(encoding="utf-8")
              for p in (DOCS / "peers").glob("*/peers.md")}  # fmt: skip
    body_rows = [r for r in rows if not r.startswith("| method")]
    assert len(body_rows) >= 10
    for row in body_rows:
        assert any(row in text.splitlines() for text in tables.values()), row


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (a ``\\|`` inside a cell does not split it)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_the_readme_measures_table_is_the_measured_one() -> None:
    """Every row of the README's table of measures carries, after its formula, the figures of
    the measured row of the same name on the measures page, word for word."""

    def rows(text: str, header: str) -> dict[str, list[str]]:
        lines = text[text.index(header) :].split("\n\n")[0].splitlines()[2:]
        return {cells[0]: cells[1:] for cells in (split_row(line) for line in lines)}

    page = (DOCS / "concepts" / "measures.md").read_text(encoding="utf-8")
    measured = rows(page, "| measure | s / 10k samples |")
    ours = rows(README, "| measure | F | s / 10k samples |")
    assert len(ours) >= 10
    for name, cells in ours.items():
        assert cells[1:] == measured[name], name


def test_the_readme_diagonality_table_is_the_committed_studies() -> None:
    """Each row of the README's K-FAC table is computed here from the committed kfac.csv of a
    study: the diagonal's and no EWC's test mean, the others' paired difference and p."""
    import pandas as pd

    measures = ("diagonal FIM", "K-FAC", "FIM blocks", "MaSQ (mean)", "no EWC")

    def cell(table: pd.DataFrame, measure: str) -> str:
        if measure not in table.index:
            return "—"
        r = table.loc[measure]
        if measure in ("diagonal FIM", "no EWC"):
            return f"{100 * r['test_mean']:.2f}"
        return f"{100 * r['diff']:+.2f} (p {r['p']:.3f})"

    expected = []
    for path in sorted((DOCS / "kfac").glob("*/kfac.csv")):
        frame = pd.read_csv(path, dtype={"hidden": str})
        for (slt, hidden, scenario), part in frame.groupby(["slt", "hidden", "scenario"]):
            cells = [cell(part.set_index("measure"), m) for m in measures]
            expected.append(f"| {slt}, 784-{hidden}-10, {scenario} | " + " | ".join(cells) + " |")
    start = README.index("| SLT, net, scenario | diagonal FIM |")
    rows = README[start:].split("\n\n")[0].splitlines()[2:]
    assert len(rows) >= 4
    assert sorted(rows) == sorted(expected)


def test_the_records_page_names_every_field_of_every_stage() -> None:
    """The stage table of docs/concepts/records.md lists exactly each stage's fields, and its
    list of the fields added since store format 1 is exact: a new field must be added there."""
    from masq.config import FIELDS

    text = (DOCS / "concepts" / "records.md").read_text(encoding="utf-8")
    for stage in ("data", "first", "importance", "later", "run"):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {stage} |")]
        listed = re.findall(r"`([a-z0-9_]+)`", line.split("|")[2])
        assert listed == [f.name for f in FIELDS if f.stage.value == stage], stage
    since = text.split("leaves out a field added after store format 1")[1].split(". A run")[0]
    named = set(re.findall(r"`([a-z0-9_]+)`", since))
    assert named == {f.name for f in FIELDS if f.since_v1}


def committed_finals(
    preset: Any, variants: Mapping[Any, Mapping[str, tuple[Any, ...]]], rows: list[str]
) -> dict[tuple[str, Any], float]:
    """{(cell key, variant): the mean over the tasks of the test accuracies after the last
    one, in %} of the committed records of ``rows`` of ``preset`` run with each variant's grid
    overrides (absent where no record is committed)."""
    from masq.archive import read_archive
    from masq.runid import run_id

    wanted = {}  # run id -> (cell key, variant)
    for variant, overrides in variants.items():
        for key, configs in preset.cells(dict(overrides), rows).items():
            for config in configs:
                wanted[run_id(config)] = (key, variant)
    finals = {}
    for rid, text in read_archive(DOCS / "peers" / "records.jsonl.gz"):
        if rid in wanted:
            last = json.loads(text)["result"]["accuracy"][-1]
            finals[wanted[rid]] = 100 * sum(last) / len(last)
    return finals


def test_the_padding_table_of_the_peers_page_is_the_committed_records() -> None:
    """The peers page's 28×28-against-32×32 table (permuted MNIST, seed 0) shows what the
    committed records give: each cell the mean over the 10 tasks of the test accuracies after
    the last one, for the preset's runs with ``pad`` 0 and 2."""
    from masq.grid import peers

    page = (DOCS / "results" / "peers.md").read_text(encoding="utf-8")
    lines = page[page.index("| cell | 28×28 | 32×32 |") :].split("\n\n")[0].splitlines()[2:]
    preset = peers.load_peer_preset("vdv2019-permuted")
    former = {"permute_first": (False,), "train_on_val": (False,)}  # the preset's first settings
    variants = {pad: {"seed": (0,), "pad": (pad,), **former} for pad in (0, 2)}
    finals = committed_finals(preset, variants, ["None", "EWC", "Online EWC"])
    assert len(lines) == 6
    for line in lines:
        cell, small, padded, _ = split_row(line)
        row, column = cell.split(", ")
        key = f"{row} | {({'Task-IL': 'task', 'Domain-IL': 'domain'})[column]}"
        assert (small, padded) == (f"{finals[(key, 0)]:.2f}", f"{finals[(key, 2)]:.2f}"), line


def test_the_peers_pages_masq_mean_and_sum_pairs_are_the_committed_records() -> None:
    """The peers page's claim that MaSQ ``sum`` at λ is MaSQ ``mean`` at B·λ quotes seed 0's
    runs of the 2025 table at B = 1,000: each number is the committed record's average test
    accuracy after the last task, and the pairs it calls equal agree to 0.05 points."""
    from masq.grid import peers

    preset = peers.load_peer_preset("vdv2025-fisher")
    rows = {"mean": "MaSQ (mean), B = 1000", "sum": "MaSQ (sum), B = 1000"}
    lams = (1e4, 1e7, 1e8, 1e9, 1e11, 1e12)
    variants = {lam: {"seed": (0,), "lam": (lam,)} for lam in lams}
    finals = committed_finals(preset, variants, list(rows.values()))
    final = {(scale, lam): f"{finals[(peers.cell_key(row, 'task'), lam)]:.2f}"
             for scale, row in rows.items() for lam in lams
             if (peers.cell_key(row, "task"), lam) in finals}  # fmt: skip
    page = " ".join((DOCS / "results" / "peers.md").read_text(encoding="utf-8").split())
    m11, m12, s8, s9 = (final[("mean", 1e11)], final[("mean", 1e12)], final[("sum", 1e8)],
                        final[("sum", 1e9)])  # fmt: skip
    assert (f"`mean` at λ 1e11 and 1e12 ends at {m11} and {m12}, `sum` at 1e8 and 1e9 at {s8} "
            f"and {s9}") in page  # fmt: skip
    assert abs(float(m11) - float(s8)) <= 0.05 and abs(float(m12) - float(s9)) <= 0.05
    assert f"(`mean` at 1e7: {final[('mean', 1e7)]}, `sum` at 1e4: {final[('sum', 1e4)]})" in page


def test_the_former_settings_table_of_the_peers_page_is_the_committed_records() -> None:
    """The peers page's table of permuted MNIST under the preset's former data settings (task 1
    unpermuted, 55,000 images: ``--no-permute-first --no-train-on-val``) and the preset's
    (the code's way), seeds 0-2: each seed's number is the committed record's mean over the 10
    tasks of the test accuracies after the last one, then their mean ± SEM; published as in
    the preset."""
    from masq.grid import peers

    page = (DOCS / "results" / "peers.md").read_text(encoding="utf-8")
    header = "| cell | former settings, seeds 0-2 | mean ± SEM | the preset, seeds 0-2 |"
    lines = page[page.index(header) :].split("\n\n")[0].splitlines()[2:]
    preset = peers.load_peer_preset("vdv2019-permuted")
    former = {"permute_first": (False,), "train_on_val": (False,)}
    ways = {("former", s): {"seed": (s,), **former} for s in range(3)}
    ways |= {("preset", s): {"seed": (s,)} for s in range(3)}
    finals = committed_finals(preset, ways, ["None", "EWC", "Online EWC", "SI"])
    columns = {"Task-IL": "task", "Class-IL": "class-blocks"}
    assert len(lines) == 6
    for line in lines:
        cell, *cells, published = split_row(line)
        row, column = cell.removesuffix(" ◆").split(", ")
        key = f"{row} | {columns[column]}"
        for way, seeds, mean in zip(("former", "preset"), cells[::2], cells[1::2], strict=True):
            values = [finals[(key, (way, s))] for s in range(3)]
            assert seeds == ", ".join(f"{v:.2f}" for v in values), line
            sem = statistics.stdev(values) / math.sqrt(3)
            assert mean == f"{statistics.fmean(values):.2f} ± {sem:.2f}", line
        mean, spread = next(r for r in preset.rows if r.name == row).published[columns[column]]
        assert published == f"{mean:.2f} ± {spread:.2f}", line


def test_the_peers_pages_more_seeds_of_ewc_in_class_il_are_the_committed_records() -> None:
    """The permuted table's EWC Class-IL cell on seeds 3-6, quoted on the peers page, is what
    the committed records give, and so are the mean ± SEM over seeds 0-6 and its SD."""
    from masq.grid import peers

    preset = peers.load_peer_preset("vdv2019-permuted")
    ways = {s: {"seed": (s,), "scenario": ("class-blocks",)} for s in range(7)}
    finals = committed_finals(preset, ways, ["EWC"])
    values = [finals[("EWC | class-blocks", s)] for s in range(7)]
    page = " ".join((DOCS / "results" / "peers.md").read_text(encoding="utf-8").split())
    more = values[3:]
    quoted = ", ".join(f"{v:.2f}" for v in more[:-1]) + f" and {more[-1]:.2f}"
    sem = statistics.stdev(more) / 2
    assert f"they end at {quoted}, so {statistics.fmean(more):.2f} ± {sem:.2f}" in page
    sem = statistics.stdev(values) / math.sqrt(7)
    spread = f"{statistics.fmean(values):.2f} ± {sem:.2f} (SD {statistics.stdev(values):.2f})"
    assert f"Over seeds 0-6 the cell is {spread}" in page
