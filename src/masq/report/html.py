"""One browsable report (``masq report``): a static HTML page and the same content as Markdown.

:func:`build_report` reads any number of directories, each a grid's results directory
(:mod:`masq.store`) and/or an analysis output directory (the manifests of
:mod:`masq.analysis.common`, in the directory itself or in its ``analysis/``), and writes
``index.html``, ``report.md`` and the figures (PNG) next to them. Parts, in order:

1. Table 1 per results directory (the same cells as ``masq table``);
2. the consistency figures (``masq consistency`` writes them to RESULTS/figures);
3. Table 2 (``masq analyze diagonality``);
4. FIM versus MaSQ (``masq analyze compare``);
5. the λ sweeps (``masq analyze lambda``);
6. the speed/memory table of the importance benchmark (``--bench FILE``);
7. accuracy matrices of runs of more than two tasks;
8. IMM runs (consolidation ``mean-imm`` / ``mode-imm``);
9. Table 1 settled over seeds (a directory written by ``masq table1``: its tables and the
   ε2 × λ plane figures).

Each part has a caption saying what was run (configuration, seeds, precision, date, machine,
masq version) and the command that regenerates it; a part with nothing to show says which
command produces it. Pages are rendered with Jinja2 templates (``report/templates``).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from masq import __version__
from masq.config import hidden_text
from masq.errors import ConfigError
from masq.fileio import atomic_write, save_png
from masq.report.page import Figures, FigureSink, Part, Table, markdown_tables
from masq.report.tables import table1, to_markdown
from masq.store import load, load_result, open_store


def _date(path: Path) -> str:
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, tz=datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d")


def _is_store(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "runs").is_dir()


def _manifests(path: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    from masq.analysis.common import read_manifest  # torch: only when a report is built

    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for folder in (path, path / "analysis"):
        for name in ("diagonality", "compare", "lambda", "kfac", "peers"):
            record = read_manifest(folder / f"{name}.json")
            if record is not None and name not in found:
                found[name] = (folder, record)
    return found


def _provenance_text(p: dict[str, Any]) -> str:
    return (
        f"run {p.get('created', '?')} on {p.get('machine', '?')}, masq "
        f"{p.get('masq_version', '?')}, torch {p.get('torch_version', '?')}"
    )


# ----------------------------------------------------------------------------- parts


def _store_meta(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    """Provenance of a results dir: the date of its newest run (from the records' ``finished``
    stamps; records older than those stamps: the newest file's date, marked "stored"), and the
    device, threads and versions of its first run."""
    record = open_store(root).read_record(str(df["run_id"].iloc[0]))
    meta = record["result"].get("meta", {})
    stamps = [s for s in df["finished"] if s]  # flat_row: "" where a record has none
    if stamps:
        when = f"last run {max(stamps)[:10]}"
    else:  # records without stamps (an imported one carries the import's file date)
        newest = max((root / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
        when = f"stored {_date(newest)}"
    return {
        "when": when,
        "machine": f"device {meta.get('device', '?')}, {meta.get('threads', '?')} torch threads",
        "masq_version": meta.get("masq_version", "?"),
        "torch_version": meta.get("torch_version", "?"),
    }


def _table1_part(stores: list[tuple[Path, pd.DataFrame]], select_on: str) -> Part:
    part = Part("table1", "Table 1: the best configuration per SLT")
    if not stores:
        part.missing = (
            "masq grid --preset paper --results DIR  (the paper's grid: 1,728 runs; add --dry-run "
            "for its time first; then: masq report --results DIR)"
        )
        return part
    captions, commands = [], []
    for root, df in stores:
        table = table1(df, select_on=select_on)
        _, tables = markdown_tables(to_markdown(table))
        meta = _store_meta(root, df)
        for t in tables:
            t.caption = f"{root}: " + (t.caption or "Table 1")
        part.tables += tables
        configs = ", ".join(
            f"{slt}: {df[df['slt'] == slt]['hidden'].nunique()} architecture(s), "
            f"{len(df[df['slt'] == slt])} runs"
            for slt in sorted(df["slt"].unique())
        )
        precision = ", ".join(sorted(df["precision"].astype(str).unique()))
        seeds = ", ".join(str(s) for s in sorted(df["seed"].unique()))
        captions.append(
            f"{root}: {configs}; iterations {sorted(df['iters1'].unique())[0]} + "
            f"{sorted(df['iters2'].unique())[0]}, evaluation every "
            f"{sorted(df['eval_every'].unique())[0]}; seeds {seeds}; precision {precision}; "
            f"{meta['when']}, {meta['machine']}, masq {meta['masq_version']}"
        )
        commands.append(f"masq table --results {root} --select-on {select_on}")
    part.caption = " | ".join(captions)
    part.command = "; ".join(commands)
    return part


SETTLED_TABLES: tuple[str, ...] = (
    "table1_settled_test.md",
    "table1_settled_val.md",
    "paired.md",
    "gain.md",
    "inflation.md",
)
# the settled part's figures, in this order: (file pattern, caption prefix)
SETTLED_FIGURES: tuple[tuple[str, str], ...] = (
    ("plane_*.png", "best and last against λ"),
    ("winners_*.png", "the winners' curves (consistency)"),
)


def _is_settled(path: Path) -> bool:
    return (path / SETTLED_TABLES[0]).is_file()


def _settled_part(folders: list[Path], figs: FigureSink) -> Part:
    part = Part("settled", "Table 1, settled: selection on seed 0, confirmation on seeds 1-4")
    for i, folder in enumerate(folders):
        for name in SETTLED_TABLES:
            if (folder / name).is_file():
                notes, tables = markdown_tables((folder / name).read_text(encoding="utf-8"))
                for table in tables:
                    table.caption = table.caption or name
                part.tables += tables
                part.text += [n for n in notes if n.startswith("- not stored yet")][:1]
            csv = (folder / name).with_suffix(".csv")
            if csv.is_file():
                part.links.append((figs.add(csv, f"settled{i}"), f"{csv.name} (all numbers)"))
        for pattern, what in SETTLED_FIGURES:
            for png in sorted(folder.glob(pattern)):
                part.figures.append((figs.add(png, f"settled{i}"), f"{what}: {png.stem}"))
    part.caption = (
        "each cell: the seed-0 value that selected the configuration (mean ± std over the "
        "confirmation seeds); paired t-tests of MaSQ against the FIM and of EWC against no EWC "
        "(ε2 tuned alike) over those seeds; "
        "inflation = seed-0 value − confirmation mean; the winners' test curves over task 1 "
        "and re-training (FIM, MaSQ and no EWC, seed 0)"
    )
    part.command = "make table1  (masq table1 --results DIR --out DIR)"
    if not part.present:
        part.missing = "make table1 (or masq table1 --results DIR --out DIR), then masq report"
    return part


def _consistency_part(stores: list[tuple[Path, pd.DataFrame]], figs: FigureSink) -> Part:
    part = Part("consistency", "Consistency check (Gepperth & Wiech 2019, section 5.2)")
    commands = []
    for i, (root, _) in enumerate(stores):
        pngs = sorted((root / "figures").glob("consistency_*.png"))
        for png in pngs:
            part.figures.append((figs.add(png, f"r{i}"), f"{root}: {png.stem}"))
        if pngs:
            dates = max(_date(p) for p in pngs)
            part.caption += f"{root}: each SLT's winner with MaSQ, FIM at λ = 1/ε2 and no EWC, "
            part.caption += f"drawn {dates}. "
        commands.append(f"masq consistency --results {root}")
    part.command = "; ".join(commands)
    if not part.present:
        part.missing = "; ".join(commands) if commands else "masq consistency --results DIR"
    return part


def _analysis_part(
    name: str, title: str, found: list[tuple[Path, dict[str, Any]]], figs: FigureSink
) -> Part:
    part = Part(name, title)
    missing = {
        "diagonality": "masq analyze diagonality --out DIR",
        "compare": "masq analyze compare --results DIR --out DIR",
        "lambda": "masq analyze lambda --slt D5-5 D9-1 DP10-10 --results DIR",
        "kfac": "masq analyze kfac --slt D5-5 --hidden 30-30 --seeds 5 --results DIR",
        "peers": "masq grid --preset vdv2019-split --results DIR; masq peers vdv2019-split "
        "--results DIR",
    }
    if not found:
        part.missing = f"{missing[name]}  (then: masq report --results DIR)"
        return part
    captions, commands = [], []
    for i, (folder, manifest) in enumerate(found):
        files = manifest.get("files", {})
        for key in ("needed_markdown", "markdown"):
            md = folder / str(files.get(key, ""))
            if key in files and md.is_file():
                _, tables = markdown_tables(md.read_text(encoding="utf-8"))
                if name == "lambda" and key == "markdown":  # long: a link instead of a table
                    part.links.append((figs.add(md, f"{name}{i}"), "every (method, λ) point"))
                    continue
                part.tables += tables
        csv = folder / str(files.get("csv", ""))
        if "csv" in files and csv.is_file():
            part.links.append((figs.add(csv, f"{name}{i}"), f"{csv.name} (all numbers)"))
        for png in files.get("figures", []):
            if (folder / png).is_file():
                part.figures.append((figs.add(folder / png, f"{name}{i}"), f"{name}: {png}"))
        captions.append(_analysis_caption(name, manifest))
        commands.append(str(manifest.get("command", "")))
    part.caption = " | ".join(captions)
    part.command = "; ".join(c for c in commands if c)
    if not part.present:
        part.missing = f"{missing[name]} (its output files are missing)"
    return part


def _analysis_caption(name: str, m: dict[str, Any]) -> str:
    prov = _provenance_text(m.get("provenance", {}))
    seconds = m.get("seconds", {})
    if not seconds:
        took = ""
    elif m.get("runs_now", m.get("runs")) != m.get("runs"):  # a resumed sweep
        took = (
            f"; its last invocation ran {m['runs_now']} of the {m.get('runs')} runs in "
            f"{float(seconds.get('grid', 0)):.0f} s (the others were stored)"
        )
    else:
        took = f"; took {float(seconds.get('total', seconds.get('grid', 0))):.0f} s"
    if name == "diagonality":
        c = m.get("config", {})
        trained = (
            f"the state {m['state']}"
            if m.get("state")
            else f"trained {c.get('iters1')} iterations ({c.get('init')} init, seed "
            f"{c.get('seed')}, precision {c.get('precision', 'fp32')})"
        )
        what = (
            f"784-{hidden_text(c.get('hidden', []))}-10 on D1 of {c.get('slt')}, {trained}; "
            f"statistics over N = {m.get('samples')} samples; "
            f"task-1 accuracy {float(m.get('train_accuracy', float('nan'))):.4f}"
        )
    elif name == "compare":
        parts = []
        for s in m.get("states", []):
            c = s.get("config", {})
            parts.append(
                f"{s.get('slt')} 784-{hidden_text(c.get('hidden', []))}-10 ({c.get('iters1')} "
                f"iterations, {c.get('init')} init, seed {c.get('seed')}, precision "
                f"{c.get('precision', 'fp32')}, N = {s.get('samples')})"
            )
        what = "task-1 states: " + "; ".join(parts)
    elif name == "peers":
        what = (
            f"{m.get('title')} ({m.get('citation')}); {m.get('runs')} of its "
            f"{m.get('expected')} runs stored; {m.get('marked')} cell(s) marked"
        )
        if compute := m.get("compute"):
            hours = float(compute["worker_seconds"]) / 3600
            what += f"; its {compute['runs']} stored runs took {hours:.1f} worker-hours"
    else:
        slts = ", ".join(
            f"{s['slt']} 784-{s['hidden']}-10 at ε2 = {s['lr2']:g}" for s in m.get("slts", [])
        )
        lams = m.get("lams", [])
        what = (
            f"{slts}; {m.get('runs')} runs, {m.get('seeds')} seed(s), λ from {lams[0]:g} to "
            f"{lams[-1]:g} ({len(lams)} values) and 0; settings {m.get('config', {})}; "
            f"precision {m.get('precision', 'fp32')}"
            if lams
            else slts
        )
    return f"{what}; {prov}{took}"


def _bench_part(bench: Sequence[str | os.PathLike[str]]) -> Part:
    part = Part("bench", "Speed and memory of the importance computations")
    for path in bench:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--bench {str(p)!r}: no such file; give a benchmark output file")
        other, tables = markdown_tables(p.read_text(encoding="utf-8"))
        part.tables += tables
        part.text.append("\n".join(other))
        part.caption += f"{p} (written {_date(p)}). "
    part.command = "python benchmarks/importance.py > FILE  (then: masq report --bench FILE)"
    if not part.present:
        part.missing = part.command
    return part


def _matrices_part(stores: list[tuple[Path, pd.DataFrame]], figs: FigureSink) -> Part:
    from masq.report import figures

    part = Part("matrices", "Accuracy matrices of runs of more than two tasks")
    for root, df in stores:
        many = df[df["tasks"] > 2]
        if many.empty:
            continue
        table = table1(many)
        for _, row in table[table["criterion"] == "best"].iterrows():
            rid = sorted(str(row["run_ids"]).split(","))[0]
            result = load_result(root, rid)
            path, link = figs.draw(f"accuracy_{str(row['slt']).replace('/', '_')}.png")
            save_png(figures.accuracy_figure(result), path, dpi=figures.FIGURE_DPI)
            part.figures.append((link, f"{row['slt']}: accuracy matrix of the best run"))
        part.caption += f"{root}: the Table-1 winner (best) of each SLT with more than two tasks. "
        part.command += f"masq table --results {root}; "
    if not part.present:
        part.missing = (
            "masq grid --slt D2-2-2-2-2 --hidden 200-200 --lr 1e-3 --lam 0 1000 --iters 1000 "
            "--results DIR  (any SLT of more than 2 tasks)"
        )
    return part


def _imm_part(stores: list[tuple[Path, pd.DataFrame]]) -> Part:
    part = Part("imm", "Incremental Moment Matching (IMM)")
    for root, df in stores:
        imm = df[df["consolidation"].astype(str).str.contains("imm")]
        if imm.empty:
            continue
        header = ["SLT", "consolidation", "importance", "λ", "best %", "last %", "run id"]
        rows = [
            [
                str(r["slt"]),
                str(r["consolidation"]),
                str(r["importance"]),
                f"{r['lam']:g}",
                f"{100 * r['best.union']:.2f}",
                f"{100 * r['last.union']:.2f}",
                str(r["run_id"]),
            ]
            for _, r in imm.sort_values(["slt", "consolidation", "run_id"]).iterrows()
        ]
        part.tables.append(Table(header, rows, f"{root}: IMM runs"))
        part.command += f"masq table --results {root}; "
    if not part.present:
        part.missing = "IMM runs (consolidation mean-imm or mode-imm) in a results directory"
    return part


# ----------------------------------------------------------------------------- build


LISTING = ".masq-report.json"  # the files a build copied or drew (removed by the next build)


def _remove_earlier(out_dir: Path) -> None:
    """Remove the figures and data files an earlier build wrote into ``out_dir`` (as listed
    in its :data:`LISTING`), and nothing else."""
    listing = out_dir / LISTING
    if not listing.is_file():
        return
    try:
        names = json.loads(listing.read_text(encoding="utf-8")).get("files", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    for name in names:
        if isinstance(name, str) and "/" not in name and not name.startswith("."):
            (out_dir / name).unlink(missing_ok=True)


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    html: Path
    markdown: Path
    parts: list[Part]


def templates() -> jinja2.Environment:
    """The report's Jinja2 templates (``report/templates``): ``report.html.j2``,
    ``report.md.j2`` and ``part.md.j2`` (one part as Markdown, also used by the site)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("masq.report", "templates"),
        autoescape=lambda name: name is not None and ".html" in name,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["mdcell"] = lambda cell: str(cell).replace("|", "\\|")
    return env


def collect_parts(
    results: Sequence[str | os.PathLike[str]],
    figs: FigureSink,
    *,
    bench: Sequence[str | os.PathLike[str]] = (),
    select_on: str = "test",
) -> list[Part]:
    """The report's parts (module docstring), in order, from ``results`` and ``bench``:
    figures and data files go through ``figs`` (copied next to the page, or linked where they
    are: :mod:`masq.report.site`)."""
    stores: list[tuple[Path, pd.DataFrame]] = []
    found: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    settled: list[Path] = []
    for entry in results:
        root = Path(entry)
        if not root.is_dir():
            raise ConfigError(f"--results {str(root)!r}: no such directory")
        manifests = _manifests(root)
        if _is_settled(root):
            settled.append(root)
        if _is_store(root):
            df = load(root)
            if not df.empty:
                stores.append((root, df))
        elif not manifests and not _is_settled(root):
            raise ConfigError(
                f"--results {str(root)!r} holds neither stored runs nor analysis outputs; "
                "give a directory written by `masq grid`, `masq analyze` or `masq table1`"
            )
        for name, value in manifests.items():
            found.setdefault(name, []).append(value)
    return [
        _table1_part(stores, select_on),
        _consistency_part(stores, figs),
        _analysis_part(
            "diagonality",
            "Table 2: how diagonal is the Fisher?",
            found.get("diagonality", []),
            figs,
        ),
        _analysis_part("compare", "FIM versus MaSQ", found.get("compare", []), figs),
        _analysis_part(
            "lambda", "λ sweeps: what λ does each measure need?", found.get("lambda", []), figs
        ),
        _analysis_part(
            "kfac",
            "Does the Fisher's off-diagonal part matter? Diagonal, K-FAC, per-layer blocks",
            found.get("kfac", []),
            figs,
        ),
        _analysis_part(
            "peers",
            "The field's reference tables: published numbers beside ours",
            found.get("peers", []),
            figs,
        ),
        _bench_part(bench),
        _matrices_part(stores, figs),
        _imm_part(stores),
        _settled_part(settled, figs),
    ]


def build_report(
    results: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    bench: Sequence[str | os.PathLike[str]] = (),
    select_on: str = "test",
    title: str = "masq report",
) -> Report:
    """Read ``results`` (module docstring) and write ``out``/index.html, report.md and the
    figures; every part that has nothing to show names the command that produces it."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is an existing file; give a directory path")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_earlier(out_dir)
    figs = Figures(out_dir)
    parts = collect_parts(results, figs, bench=bench, select_on=select_on)
    env = templates()
    context = {
        "title": title,
        "parts": parts,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "sources": [str(r) for r in results] + [str(b) for b in bench],
    }
    html = atomic_write(out_dir / "index.html", env.get_template("report.html.j2").render(context))
    md = atomic_write(out_dir / "report.md", env.get_template("report.md.j2").render(context))
    listing = {"format": "masq-report", "files": sorted(figs.used)}
    atomic_write(out_dir / LISTING, json.dumps(listing, indent=1) + "\n")
    return Report(html=html, markdown=md, parts=parts)
