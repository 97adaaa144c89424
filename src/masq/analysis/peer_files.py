"""The files of a peer table (``masq peers NAME``): its Markdown, figure and notes.

:mod:`masq.analysis.peers` computes the table (ours beside the published values, the marks)
and the paired tests; this module lays them out as the publication does and writes them:
peers.md (the table, what its runs cost, the task-1 note, the paired tests), peers.csv,
peers_points.csv (every run), peers.png and the manifest peers.json.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masq.analysis.common import EDGE_MARKS, edge_note, markdown, write_analysis_files
from masq.analysis.peers import MARK, MIN_POINTS, paired_table, task1_states
from masq.grid.peers import PeerPreset


def paired_markdown(paired: pd.DataFrame, preset: PeerPreset) -> str:
    """:func:`paired_table` as Markdown ("" when it is empty)."""
    if paired.empty:
        return ""
    records = [
        {
            "label": r["label"],
            "method": r["method"],
            "pairs": int(r["pairs"]),
            "diff": "—" if not math.isfinite(r["diff"]) else f"{r['diff']:+.2f}",
            "ci": "—"
            if not math.isfinite(r["ci_low"])
            else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
            "p": p_text(r["p"]),
        }
        for r in paired.to_dict("records")
    ]
    title = (
        f"Ours, paired by seed against {preset.reference} (each row at its own λ): the mean "
        "difference in points, its 95 % confidence interval and the paired t-test's p."
    )
    columns = [("label", "column"), ("method", "method"), ("pairs", "seeds"),
               ("diff", f"− {preset.reference} (pp)"), ("ci", "95 % CI"), ("p", "p")]  # fmt: skip
    return markdown(records, columns, title)


def p_text(p: float) -> str:
    """A p-value as the paired tables print it: three decimals, "< 0.001" below that
    (never "0.000"), "—" where there is none (fewer than two pairs)."""
    if not math.isfinite(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _number(mean: float, spread: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.2f}" + ("" if not math.isfinite(spread) else f" ± {spread:.2f}")


def lam_number(lam: float) -> str:
    """λ as the tables print it: its significant digits in scientific notation, "5e2",
    "2.5e2", "2e-01", "0"."""
    if lam == 0:
        return "0"
    mantissa, exponent = f"{lam:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}".replace("e+0", "e").replace("e+", "e")


def _lam_text(r: Mapping[str, Any]) -> str:
    if not r.get("reads_lam", True):
        return "no λ"
    text = lam_number(float(r["lam"]))
    edge = EDGE_MARKS.get(str(r.get("edge") or ""), "")
    return f"λ {text}{edge}" + (" (val)" if r["lam_chosen_on_val"] else "")


def peer_markdown(table: pd.DataFrame, preset: PeerPreset) -> str:
    """The table as the publication lays it out: one row per method; per column ours
    (mean ± SEM, the λ used), the published value, Δ and the mark."""
    columns: list[tuple[str, str]] = [("method", "method")]
    for column in preset.columns:
        label = preset.label(column)
        columns += [(f"{column}:ours", f"{label}: ours"), (f"{column}:pub", f"{label}: published"),
                    (f"{column}:diff", "Δ")]  # fmt: skip
    records = []
    for row in preset.rows:
        record: dict[str, Any] = {"method": row.name + (" (ours)" if row.ours else "")}
        for column in preset.columns:
            hit = table[(table["method"] == row.name) & (table["column"] == column)]
            if hit.empty:
                record[f"{column}:ours"] = "not run yet"
            else:
                r = cast(dict[str, Any], hit.iloc[0].to_dict())
                seeds = f"n={r['seeds']}"
                if r["diverged"]:
                    seeds += f", {r['diverged']} diverged"
                if r.get("runs", 0) < r.get("expected", 0):
                    seeds += f"; partial: {r['runs']} of {r['expected']} runs"
                ours = _number(r["mean"], r["sem"])
                record[f"{column}:ours"] = f"{ours} ({_lam_text(r)}; {seeds})"
                if math.isfinite(r["diff"]):
                    mark = f" {MARK}" if r["marked"] else ""
                    record[f"{column}:diff"] = f"{r['diff']:+.2f}{mark}"
            pub = row.published.get(column)
            record[f"{column}:pub"] = _number(*pub) if pub else "—"
            record.setdefault(f"{column}:diff", "—")
        records.append(record)
    title = (
        f"{preset.title}. Ours: {preset.statistic}, mean ± SEM over seeds (n), at the λ given "
        f"((val): chosen on the validation sets). Published: {preset.citation}, {preset.source} "
        f"({preset.spread}). {MARK}: |Δ| > {MIN_POINTS:g} point and two combined SEMs (never "
        "on a partial cell, whose λ sweep or seeds are not all stored yet)."
    )
    notes = "".join(f"\n- {n}" for n in preset.notes)
    text = markdown(records, columns, title) + notes + ("\n" if notes else "")
    if any(str(r.get("edge") or "") for r in table.to_dict("records")):
        text += edge_note(
            f"extend the row's λ values (masq grid --preset {preset.name} --rows ROW --lam ...)"
        )
    return text


def peer_figure(table: pd.DataFrame, preset: PeerPreset) -> Figure:
    """One panel per column: per method our mean ± SEM (bar) and the published value ±
    its spread (black diamond)."""
    columns = [c for c in preset.columns if c in set(table["column"])]
    width = max(6.0, 3.6 * len(columns))
    fig = Figure(figsize=(width, 0.45 * len(preset.rows) + 1.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(columns)), squeeze=False, sharey=True)[0])
    names = [r.name for r in preset.rows]
    ys = np.arange(len(names))[::-1]
    for ax, column in zip(axes, columns, strict=False):
        part = table[table["column"] == column].set_index("method")
        mean = np.array([part["mean"].get(n, math.nan) for n in names], float)
        sem = np.array([part["sem"].get(n, math.nan) for n in names], float)
        ax.barh(ys, np.nan_to_num(mean), xerr=np.nan_to_num(sem), color="tab:blue", alpha=0.7,
                capsize=2, label="ours")  # fmt: skip
        pub = np.array([part["published"].get(n, math.nan) for n in names], float)
        spread = np.array([part["published_spread"].get(n, math.nan) for n in names], float)
        ax.errorbar(pub, ys, xerr=np.nan_to_num(spread), fmt="D", color="black", markersize=4,
                    capsize=2, label="published")  # fmt: skip
        ax.set_title(preset.label(column), fontsize=9)
        shown = np.concatenate([mean - np.nan_to_num(sem), pub - np.nan_to_num(spread)])
        low = np.nanmin(shown) if np.isfinite(shown).any() else 0.0
        ax.set_xlim(max(0.0, 10 * math.floor((low - 2) / 10)), 100)  # room to see the gaps
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("average accuracy, %", fontsize=8)
    axes[0].set_yticks(ys, names, fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("\n".join(textwrap.wrap(preset.title, int(width * 13))), fontsize=9)
    return fig


def compute_note(runs: int, worker_hours: float, read: int | None = None) -> str:
    """The Markdown line that says what the runs stored for the table's cells cost (``read``:
    how many of them the table reads, where fewer)."""
    reads = f" (the table reads {read} of them)" if read is not None and read < runs else ""
    return (
        f"\nCompute: the {runs} runs stored for the table's cells{reads} took "
        f"{worker_hours:.1f} worker-hours, the sum of the training and importance times their "
        "records hold (a task-1 state or importance pass that runs share counted once; a "
        "stack's runs split its time).\n"
    )


def task1_note(mixed: int, groups: int, runs: int) -> str:
    """The line under a table whose runs start from more than one task-1 state per group
    (:func:`task1_states`); "" where none does."""
    if not mixed:
        return ""
    return (
        f"\nTask-1 states: in {mixed} of the {groups} groups of runs with the same task-1 "
        f"settings ({runs} runs), the runs did not all start from one task-1 state (their "
        "accuracies after task 1 differ): the states were trained apart, in float arithmetic "
        "that rounds differently (another processor or thread count), and later training "
        "amplifies that rounding (docs/results/peers.md).\n"
    )


def write_outputs(
    table: pd.DataFrame,
    frame: pd.DataFrame,
    preset: PeerPreset,
    out: str | Path,
    *,
    body: Mapping[str, Any] | None = None,
) -> tuple[str, list[Path]]:
    """Write ``out``/peers.md (:func:`peer_markdown`, the :func:`compute_note` of
    ``body["compute"]`` where given, then :func:`paired_markdown`) and
    peers.csv (:func:`peer_table`), peers_points.csv (every run), peers.png
    (:func:`peer_figure`) and the manifest peers.json (``body`` plus the preset, files and
    provenance); (the Markdown, the paths written)."""
    paired = paired_table(frame, preset)
    md = peer_markdown(table, preset)
    compute = (body or {}).get("compute")
    if compute:
        read = (body or {}).get("runs")
        hours = float(compute["worker_seconds"]) / 3600
        md += compute_note(int(compute["runs"]), hours, None if read is None else int(read))
    md += task1_note(*task1_states(frame))
    if not paired.empty:
        md += "\n" + paired_markdown(paired, preset)
    own = {"preset": preset.name, "title": preset.title, "citation": preset.citation,
           "marked": int(table["marked"].sum()) if not table.empty else 0}  # fmt: skip
    figures = [("peers.png", peer_figure(table, preset))]
    read = ["task1", "after_task1", "task1_state"]  # by task1_states above
    points = frame.drop(columns=read, errors="ignore")
    written = write_analysis_files(
        out, "peers", md, table, points, figures, {**(body or {}), **own}
    )
    return md, written


__all__ = [
    "compute_note",
    "lam_number",
    "p_text",
    "paired_markdown",
    "peer_figure",
    "peer_markdown",
    "task1_note",
    "write_outputs",
]
