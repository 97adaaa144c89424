"""What every analysis shares: provenance, manifests and atomic PNG/table writes.

An analysis writes into its output directory the data (CSV), a Markdown table, its figures
(PNG) and a manifest ``<name>.json``::

    {"format": "masq-analysis", "analysis": "diagonality" | "compare" | "lambda" | "kfac" | "peers",
     "command": "masq analyze ...", "provenance": {...}, "files": {...}, ...}

which :mod:`masq.report.html` reads to place the analysis in the report with a caption
saying what was run and the command that regenerates it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from masq import __version__
from masq.errors import ConfigError
from masq.fileio import atomic_write, save_png
from masq.runtime import cpu_count, cpu_model

MANIFEST_FORMAT = "masq-analysis"
ANALYSES: tuple[str, ...] = ("diagonality", "compare", "lambda", "kfac", "peers")


def provenance(device: str = "cpu", **extra: Any) -> dict[str, Any]:
    """Where and when an analysis ran: date (UTC, ISO 8601), masq and torch versions, the
    machine (architecture, processor, cores, torch threads, device) and ``extra``."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "masq_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()}, {cpu_model()}, {cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, device {device}",
        **extra,
    }


def write_manifest(out: str | os.PathLike[str], analysis: str, body: Mapping[str, Any]) -> Path:
    """Write ``out/<analysis>.json``: the manifest of one analysis (module docstring)."""
    if analysis not in ANALYSES:
        raise ValueError(f"unknown analysis {analysis!r}")
    record = {"format": MANIFEST_FORMAT, "analysis": analysis, **body}
    text = json.dumps(record, indent=1, ensure_ascii=False, default=str, allow_nan=True)
    return atomic_write(Path(out) / f"{analysis}.json", text + "\n")


def lam_on_validation(runs: pd.DataFrame) -> float:
    """The λ of ``runs`` (columns ``lam`` and ``val``, one row per run) with the highest mean
    validation accuracy over its runs, the smallest on ties; runs with a non-finite ``val``
    (diverged, or no validation set) are left out, so a λ whose every run has none is never
    chosen; NaN when no run has one."""
    finite = runs[np.isfinite(runs["val"].to_numpy(float))]
    means = finite.groupby("lam")["val"].mean().sort_index()
    if means.empty:
        return math.nan
    return float(means.index[int(np.argmax(means.to_numpy()))])


def tuning_runs(runs: pd.DataFrame, tune_seeds: int) -> pd.DataFrame:
    """The runs of one λ sweep that choose its λ (``tune_seeds``: a peer preset's, or
    ``masq analyze kfac --tune-seeds``): those of its ``tune_seeds`` smallest seeds (column
    ``seed``); every run for ``tune_seeds`` 0."""
    if tune_seeds <= 0:
        return runs
    return runs[runs["seed"].isin(sorted(runs["seed"].unique())[:tune_seeds])]


def sweep_edge(lam: float, swept: Sequence[float]) -> str:
    """ "top" when ``lam`` > 0 is the largest of the λ > 0 ``swept`` (of two or more), "bottom"
    when the smallest, else "": a choice at the edge of the sweep, whose best λ may lie
    beyond it."""
    values = sorted({float(x) for x in swept if x > 0})
    if lam <= 0 or len(values) < 2:
        return ""
    return "top" if lam == values[-1] else "bottom" if lam == values[0] else ""


EDGE_MARKS = {"top": " ▲", "bottom": " ▼"}
"""The mark after a λ chosen at an edge of its sweep (:func:`sweep_edge`)."""


def edge_note(how: str) -> str:
    """The note under a table with an edge mark: what the marks mean and ``how`` to extend."""
    return (
        "\n▲ / ▼: the λ chosen is the largest / smallest of the sweep, so the best λ may lie "
        f"beyond it: {how} before reading that row.\n"
    )


def write_analysis_files(
    out: str | os.PathLike[str],
    analysis: str,
    markdown_text: str,
    table: pd.DataFrame,
    points: pd.DataFrame,
    figures: Sequence[tuple[str, Any]],
    body: Mapping[str, Any],
) -> list[Path]:
    """Write ``out``/<analysis>.md (``markdown_text``), <analysis>.csv (``table``),
    <analysis>_points.csv (``points``), the (file name, figure) PNGs and the manifest
    <analysis>.json (``body`` plus provenance and the files); the paths written."""
    out = Path(out)
    names: dict[str, Any] = {"markdown": f"{analysis}.md", "csv": f"{analysis}.csv",
                             "points": f"{analysis}_points.csv",
                             "figures": [n for n, _ in figures]}  # fmt: skip
    written = [
        atomic_write(out / names["markdown"], markdown_text),
        atomic_write(out / names["csv"], table.to_csv(index=False)),
        atomic_write(out / names["points"], points.to_csv(index=False)),
        *(save_png(fig, out / name) for name, fig in figures),
    ]
    manifest = {**body, "provenance": provenance(), "files": names}
    written.append(write_manifest(out, analysis, manifest))
    return written


def manifest_problem(record: object, name: str) -> str | None:
    """What makes ``record`` (a parsed ``<name>.json``) not a well-formed analysis manifest,
    or None: a JSON object with "format" :data:`MANIFEST_FORMAT`, "analysis" ``name`` (when
    ``name`` is one of :data:`ANALYSES`) and "files" an object of file names (lists of them
    for "figures")."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if record.get("format") != MANIFEST_FORMAT:
        return f'"format" is {record.get("format")!r}, not {MANIFEST_FORMAT!r}'
    expected = name if name in ANALYSES else None
    if record.get("analysis") not in ANALYSES or (expected and record["analysis"] != expected):
        return f'"analysis" is {record.get("analysis")!r}, not {expected or ANALYSES!r}'
    files = record.get("files", {})
    if not isinstance(files, dict):
        return f'"files" is a JSON {type(files).__name__}, not an object of file names'
    for key, value in files.items():
        names = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in names):
            return f'"files"."{key}" is {value!r}, not a file name'
    return None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest at ``path``, None when the file is absent. A file that is there but is not
    a well-formed masq analysis manifest (unreadable, not JSON, or :func:`manifest_problem`)
    is a one-line ConfigError naming it: never taken for a missing analysis."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{p}: unreadable analysis manifest ({err}); re-run its analysis or remove the file"
        ) from None
    problem = manifest_problem(record, p.stem)
    if problem is not None:
        raise ConfigError(
            f"{p}: malformed analysis manifest ({problem}); re-run its analysis "
            "(masq analyze ...) or remove the file"
        )
    return cast(dict[str, Any], record)  # an object: manifest_problem checked it


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table: ``digits`` significant digits, NaN as "—", ints as ints."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x != x:  # NaN
        return "—"
    return f"{x:.{digits}g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def pct(x: float) -> str:
    """An accuracy as a percentage with two decimals; NaN as "—"."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """``df.to_dict("records")``: one dict per row, keyed by the frame's (string) column names."""
    return cast(list[dict[str, Any]], df.to_dict("records"))


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str]], title: str = "") -> str:
    """A Markdown table of ``rows`` with ``columns`` = [(key, header)], numbers by :func:`fmt`
    (a "|" in a cell is written as "\\|")."""
    lines = [title, ""] if title else []
    lines.append("| " + " | ".join(_cell(h) for _, h in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_cell(fmt(row.get(k))) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"
