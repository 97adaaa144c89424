"""``masq report``: the page is well formed, every image and link it references exists, its
Table 1 equals ``masq table``'s, missing parts name their command, and headless Chromium
renders something that is not blank."""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import masq.data
from masq.cli import main
from masq.report import build_report
from tests.synthetic import learnable_dataset

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip
BENCH = """data: synthetic; N = 100

| method | seconds | peak rise MiB |
|--------|---------|---------------|
|   masq |    1.19 |         63.52 |
| fisher |   1.042 |         57.42 |

fisher / masq: time 0.88x
"""


class Page(html.parser.HTMLParser):
    """Checks nesting (every non-void tag closed in order) and collects ids, references and
    the cells of every table, by section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: set[str] = set()
        self.refs: list[str] = []
        self.section = ""
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            if a["id"] in self.ids:
                self.errors.append(f"duplicate id {a['id']}")
            self.ids.add(str(a["id"]))
        for key in ("src", "href"):
            if a.get(key):
                self.refs.append(str(a[key]))
        if tag == "section":
            self.section = str(a.get("id"))
        if tag == "table":
            self.tables.setdefault(self.section, []).append([])
        if tag == "tr":
            self.tables[self.section][-1].append([])
        if tag in ("td", "th"):
            self.cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.section][-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors, page.errors
    assert page.stack == [], f"unclosed tags: {page.stack}"
    return page


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A tiny grid's results dir (with a consistency figure), an analysis output dir
    (diagonality and compare) and a benchmark file."""
    root = tmp_path_factory.mktemp("report")
    ds = learnable_dataset(n_train=300, n_val=50, n_test=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masq.data, "load", lambda *a, **k: ds)
        res, an = root / "res", root / "an"
        tiny = ["--iters1", "20", "--iters2", "10", "--eval-every", "5", "--masq-batch", "50"]
        grid = ["grid", "--preset", "none", "--slt", "D5-5", "D9-1", "--hidden", "6",
                "--lam", "0", "10", "--importance", "masq", "fisher", *tiny, "--results",
                str(res), "--workers", "1", "--threads", "1", "--no-progress"]  # fmt: skip
        assert main(grid) == 0
        diag = ["analyze", "diagonality", "--hidden", "4", "--iters", "10", "--samples", "50",
                "--out", str(an)]  # fmt: skip
        assert main(diag) == 0
        comp = ["analyze", "compare", "--slt", "D5-5", "--hidden", "4", "--iters1", "10",
                "--masq-batch", "50", "--out", str(an)]  # fmt: skip
        assert main(comp) == 0
    shutil.copyfile(an / "fisher_blocks.png", res / "figures_consistency_D5-5.png")
    (res / "figures").mkdir()
    shutil.move(res / "figures_consistency_D5-5.png", res / "figures" / "consistency_D5-5.png")
    bench = root / "bench.txt"
    bench.write_text(BENCH, encoding="utf-8")
    yield {"res": res, "an": an, "bench": bench, "root": root}


@pytest.fixture(scope="module")
def built(sources: dict[str, Path]) -> Path:
    out = sources["root"] / "page"
    build_report([sources["res"], sources["an"]], out, bench=[sources["bench"]])
    return out


def test_page_is_well_formed_and_every_reference_exists(built: Path) -> None:
    page = parse(built / "index.html")
    assert page.refs, "the page references nothing"
    for ref in page.refs:
        if ref.startswith("#"):
            assert ref[1:] in page.ids, f"anchor {ref} has no target"
        else:
            assert "/" not in ref and (built / ref).is_file(), f"missing file {ref}"
    pngs = [r for r in page.refs if r.endswith(".png")]
    assert {"diagonality0_fisher_blocks.png", "compare0_compare_maxima.png"} <= set(pngs)
    assert any(p.endswith("consistency_D5-5.png") for p in pngs)
    assert sorted(p.name for p in built.glob("*.png")) == sorted(set(pngs))  # nothing stale


def _markdown_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_table1_equals_masq_table(
    built: Path, sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["table", "--results", str(sources["res"]), "--out", str(sources["root"])]) == 0
    expected = _markdown_rows(capsys.readouterr().out)
    assert len(expected) == 1 + 2 * 2  # header + (best, last) for two SLTs
    tables = parse(built / "index.html").tables["table1"]
    assert len(tables) == 1
    assert tables[0] == expected
    numbers = [c for row in expected[1:] for c in row if re.fullmatch(r"[\d.]+( ± [\d.]+)?", c)]
    assert len(numbers) > 10  # the comparison covered the accuracies, not just labels


def test_analyses_and_bench_are_shown_with_caption_and_command(built: Path) -> None:
    page = parse(built / "index.html")
    text = " ".join(page.text)
    assert "masq analyze diagonality --slt D5-5 --hidden 4 --iters 10" in text
    assert "masq analyze compare --slt D5-5 --hidden 4" in text
    assert "masq table --results" in text
    diag = page.tables["diagonality"][0]
    assert diag[0][:4] == ["tensor", "shape", "P", "mode"] and len(diag) == 1 + 4
    assert "off-diag Σ|F|" in diag[0]  # an escaped pipe stays in its cell
    assert page.tables["bench"][0][1][:2] == ["masq", "1.19"]
    for needle in ("masq 0.", "torch", "cores", "seeds 0", "precision fp32"):
        assert needle in text, needle
    md = (built / "report.md").read_text(encoding="utf-8")
    assert "| SLT | criterion |" in md and "off-diag Σ\\|F\\|" in md
    assert "![diagonality: fisher_blocks.png](diagonality0_fisher_blocks.png)" in md


def test_table1_caption_dates_the_runs_from_their_records(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """The caption's date is the newest record's ``finished`` stamp, not a file date (files
    written by ``masq import`` carry the import's date); without stamps it says "stored"."""
    import datetime
    import json

    res = tmp_path / "res"
    shutil.copytree(sources["res"], res)
    paths = sorted((res / "runs").glob("*.json"))
    records = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    stamps = [r["result"]["meta"]["finished"] for r in records]
    assert all(datetime.datetime.fromisoformat(s).tzinfo is not None for s in stamps)
    records[0]["result"]["meta"]["finished"] = "2031-05-06T07:08:09+00:00"
    for path, record in zip(paths, records, strict=True):
        path.write_text(json.dumps(record), encoding="utf-8")
    report = build_report([res], tmp_path / "page")
    (table1,) = [p for p in report.parts if p.id == "table1"]
    assert "last run 2031-05-06" in table1.caption
    for path, record in zip(paths, records, strict=True):
        del record["result"]["meta"]["finished"]
        path.write_text(json.dumps(record), encoding="utf-8")
        os.utime(path, (0, 0))
    report = build_report([res], tmp_path / "page2")
    (table1,) = [p for p in report.parts if p.id == "table1"]
    assert "stored 1970-01-01" in table1.caption and "last run" not in table1.caption


def test_missing_parts_name_the_command_that_produces_them(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    report = build_report([sources["an"]], tmp_path / "page")
    state = {p.id: p for p in report.parts}
    assert state["diagonality"].present and state["compare"].present
    assert "masq grid" in state["table1"].missing
    assert "masq analyze lambda" in state["lambda"].missing
    assert "benchmarks/importance.py" in state["bench"].missing
    page = parse(tmp_path / "page" / "index.html")
    text = " ".join(page.text)
    assert "Produce it with:" in text and "masq analyze lambda --slt D5-5 D9-1 DP10-10" in text


def test_report_command_and_its_errors(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    assert main(["report", "--results", str(sources["res"]), "--out", str(out)]) == 0
    assert "Table 1: the best configuration per SLT: present" in capsys.readouterr().out
    assert (out / "index.html").is_file() and (out / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (
        (["--results", str(tmp_path / "nowhere")], "no such directory"),
        (["--results", str(empty)], "holds neither stored runs nor analysis outputs"),
        (["--results", str(sources["an"]), "--bench", "nope.txt"], "--bench 'nope.txt'"),
    ):
        assert main(["report", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is absent (apt-get install chromium)")
def test_headless_chromium_screenshot_is_not_blank(built: Path, tmp_path: Path) -> None:
    from matplotlib import image

    shot = tmp_path / "shot.png"
    cmd = [str(_chromium()), "--headless", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1200,1600", f"--screenshot={shot}",
           (built / "index.html").resolve().as_uri()]  # fmt: skip
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, env=env)
    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    grey = pixels.mean(axis=2)
    assert (grey < 0.9).mean() > 0.02, "the page rendered (almost) white"
    assert grey.std() > 0.05
    # the header bar (dark blue, a part of the page's style) is drawn at the top
    assert pixels[10:40, 10:200].mean() < 0.5


def test_rebuild_removes_its_own_stale_files_only(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "page"
    out.mkdir()
    (out / "mine.png").write_bytes(b"not the report's")
    build_report([sources["res"], sources["an"]], out)
    stale = [p.name for p in out.glob("*consistency_D5-5.png")]
    assert stale
    build_report([sources["an"]], out)
    assert not any((out / name).exists() for name in stale)
    assert (out / "mine.png").read_bytes() == b"not the report's"
    parse(out / "index.html")


def test_settled_table1_part_shows_the_tables_planes_and_winners_of_masq_table1(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    settled = tmp_path / "settled"
    settled.mkdir()
    (settled / "table1_settled_test.md").write_text(
        "Table 1, settled (selected on test)\n\n| SLT | criterion | D1∪D2 % |\n"
        "| --- | --- | --- |\n| D5-5 | last | 71.25 (69.80 ± 1.10) |\n",
        encoding="utf-8",
    )
    (settled / "paired.md").write_text(
        "| SLT | p |\n| --- | --- |\n| D5-5 | 0.4321 |\n", encoding="utf-8"
    )
    (settled / "gain.md").write_text(
        "| SLT | gain d (points) |\n| --- | --- |\n| D5-5 | 16.74 |\n", encoding="utf-8"
    )
    shutil.copyfile(sources["an"] / "fisher_blocks.png", settled / "plane_D5-5.png")
    shutil.copyfile(sources["an"] / "fisher_blocks.png", settled / "winners_D5-5_last_tf.png")
    report = build_report([sources["res"], settled], tmp_path / "page")
    part = {p.id: p for p in report.parts}["settled"]
    assert part.present and [t.caption for t in part.tables] == [
        "Table 1, settled (selected on test)",
        "paired.md",
        "gain.md",
    ]
    page = parse(tmp_path / "page" / "index.html")
    text = " ".join(page.text)
    assert "71.25 (69.80 ± 1.10)" in text and "0.4321" in text and "16.74" in text
    assert "settled0_plane_D5-5.png" in page.refs
    assert (tmp_path / "page" / "settled0_plane_D5-5.png").is_file()
    assert "settled0_winners_D5-5_last_tf.png" in page.refs  # the winners' curves too
    missing = {p.id: p for p in build_report([sources["res"]], tmp_path / "p2").parts}
    assert "make table1" in missing["settled"].missing
