"""A published table beside ours (``masq peers NAME``): rows are methods, columns scenarios.

The runs of each cell are those ``masq grid --preset NAME`` recorded for it
(:mod:`masq.grid.peers`). A cell's statistic is the average accuracy over all tasks after the
last one, ACC = (1/T) Σ_j ``R[T-1][j]`` (the test accuracy of task j at the end, in %), as the
field's tables report it. Per cell:

- a cell with one λ: the mean and the standard error of the mean over seeds,
  SEM = s / √n (s the sample standard deviation, n the seeds);
- a cell with several λ (a sweep): λ is chosen on the validation sets, as the λ with the
  highest mean over seeds of the same average accuracy on the tasks' validation parts
  (smallest on ties), and the test mean ± SEM is reported there, over every seed run at it;
  where the preset has ``tune_seeds`` k, the mean is over the cell's k smallest seeds (its
  tuning seeds, :func:`masq.grid.tune.tuning_split`), which alone sweep λ; where it has
  ``tune_axes``, λ is chosen on the tuning runs (those with the ``tune_axes`` values) and the
  test mean ± SEM is over the table runs (every seed at that λ, without them);
- diverged runs (non-finite accuracies) are left out of the means and counted.

Beside it: the published mean and spread, the difference Δ = ours − published, and a mark
where |Δ| > 1 point and |Δ| > 2 √(SEM² + spread²) (the spread read as the publication's SEM;
a published value without a spread counts with ours alone).

Where the preset names a ``reference`` row, :func:`paired_table` compares every other row
with it per column, each at its own λ: runs of one seed share the task split, the
initialisation and task 1's settings (its trained state too, where both start from one cached
state), so the per-seed differences d = row − reference form pairs
(:func:`masq.analysis.paired.paired_test`: mean of d, 95 % CI, two-sided p).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masq.analysis.common import (
    EDGE_MARKS,
    edge_note,
    lam_on_validation,
    markdown,
    sweep_edge,
    tuning_runs,
    write_analysis_files,
)
from masq.analysis.paired import paired_test
from masq.config import RunConfig
from masq.consolidation import get_method
from masq.curves import VAL, task_name
from masq.errors import ConfigError
from masq.grid.peers import PeerPreset, cell_key
from masq.grid.tune import held_at_chosen, matches, tuning_split

MARK = "◆"  # a cell more than 1 point and two SEMs from the published value
MIN_POINTS = 1.0


def val_average(df: pd.DataFrame) -> np.ndarray:
    """Per run, the average over its tasks of the final validation accuracy (NaN for runs
    without validation curves)."""
    out = np.full(len(df), math.nan)
    for i, (_, row) in enumerate(df.iterrows()):
        names = [f"last_val.{VAL}{task_name(j)}" for j in range(int(row["tasks"]))]
        if all(n in df.columns for n in names):
            out[i] = float(np.mean([float(row[n]) for n in names]))
    return out


def peer_frame(
    df: pd.DataFrame,
    cells: Mapping[str, Sequence[str]],
    preset: PeerPreset,
    expected: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """One row per (cell, stored run): method (row), column, λ, seed, test and validation
    average accuracy in % (NaN where a run diverged or evaluated no validation set), the
    number of runs the cell has once complete (``expected``, from the given mapping, else
    every run of ``cells``: fewer stored is a partial cell) and the run's value of each of
    the preset's ``tune_axes``."""
    if df.empty:
        raise ConfigError(f"no stored runs; run `masq grid --preset {preset.name}` first")
    df = df.set_index("run_id", drop=False)
    parts = []
    for row in preset.rows:
        for column in preset.columns:
            ids = [r for r in cells.get(cell_key(row.name, column), []) if r in df.index]
            if not ids:
                continue
            part = df.loc[ids]
            reads = [
                "lam" in get_method(m).fields and i != "none"
                for m, i in zip(part["consolidation"], part["importance"], strict=True)
            ]
            parts.append(
                pd.DataFrame(
                    {
                        "method": row.name,
                        "column": column,
                        "lam": part["lam"].astype(float).to_numpy(),
                        "reads_lam": reads,
                        "seed": part["seed"].astype(int).to_numpy(),
                        "test": 100 * part["average_accuracy"].astype(float).to_numpy(),
                        "val": 100 * val_average(part),
                        "run_id": ids,
                        "expected": (expected or {}).get(
                            cell_key(row.name, column), len(cells[cell_key(row.name, column)])
                        ),
                        **{key: part[key].to_numpy() for key in preset.tune_axes},
                        "task1": part.get("task1", part["run_id"]),  # masq.runid.d1_key
                        "after_task1": part.get("after_task1", pd.Series("", part.index)),
                        "task1_state": part.get("task1_state", pd.Series("", part.index)),
                    }
                )
            )
    if not parts:
        raise ConfigError(
            f"none of the runs of preset {preset.name} is stored yet; run `masq grid --preset "
            f"{preset.name} --results DIR` (it resumes) and tabulate again"
        )
    return pd.concat(parts, ignore_index=True)


class CellRuns(NamedTuple):
    """One cell's stored runs split as :func:`masq.grid.tune.tuning_split` splits its
    configurations (:func:`tuning_and_table`)."""

    tuning: pd.DataFrame  # the runs that choose λ
    table: pd.DataFrame  # the runs the mean ± SEM reads, at the chosen λ
    shared: bool  # the tuning runs are table runs too (no ``tune_axes`` split them off)


def tuning_and_table(
    part: pd.DataFrame, tune_seeds: int = 0, tune_axes: Mapping[str, Any] | None = None
) -> CellRuns:
    """One cell's stored runs as (tuning runs, table runs, shared), the rule of
    :func:`masq.grid.tune.tuning_split`: with ``tune_axes`` whose values some run lacks
    (:func:`masq.grid.tune.matches`), the tuning runs are the tuning seeds' runs that have them
    and the table runs all others; else the tuning runs are those of the ``tune_seeds``
    smallest seeds (:func:`masq.analysis.common.tuning_runs`) and every run is a table run."""
    axes = dict(tune_axes or {})
    values = cast(list[dict[str, Any]], part[list(axes)].to_dict("records"))
    has = pd.Series([matches(v, axes) for v in values], index=part.index, dtype=bool)
    if not has.all():
        return CellRuns(tuning_runs(part[has], tune_seeds), part[~has], shared=False)
    return CellRuns(tuning_runs(part, tune_seeds), part, shared=True)


def _chosen(runs: CellRuns) -> tuple[float, bool]:
    """(λ of the cell, whether it was chosen on validation among several): on its tuning runs
    (on its table runs where none is stored, as in a cell with one λ run apart from its
    tuning runs' settings)."""
    part = runs.tuning if not runs.tuning.empty else runs.table
    lams = sorted(part["lam"].unique())
    if len(lams) == 1:
        return float(lams[0]), False
    lam = lam_on_validation(part)
    if math.isnan(lam):
        raise ConfigError(
            "a λ sweep of the table has no validation accuracies: its runs evaluated no "
            "validation set (set eval_val = true in the preset, or pass --eval-val true) or "
            "trained on it (--train-on-val: sweep λ without it)"
        )
    return lam, True


def held_configs(
    preset: PeerPreset, cells: Mapping[str, Sequence[RunConfig]], df: pd.DataFrame
) -> tuple[list[RunConfig], int]:
    """(runs, cells waiting): for every cell with held seeds (the preset's ``tune_seeds``,
    :func:`masq.grid.tune.tuning_split`) whose tuning runs are all stored in ``df``, the held
    seeds' runs at the λ chosen on the tuning runs' validation sets; and how many such cells
    still wait for their tuning sweep (:func:`masq.grid.tune.held_at_chosen`)."""
    stored = set() if df.empty else set(df["run_id"])
    sweeps = {
        key: tuning_split(configs, preset.tune_seeds, preset.tune_axes)
        for key, configs in cells.items()
    }

    def choose(key: str, ids: list[str]) -> float:
        return _chosen(tuning_and_table(peer_frame(df, {key: ids}, preset)))[0]

    return held_at_chosen(sweeps, stored, choose)


def peer_table(frame: pd.DataFrame, preset: PeerPreset) -> pd.DataFrame:
    """One row per (method, column) in the table's order (module docstring's statistics)."""
    rows = []
    for row in preset.rows:
        for column in preset.columns:
            part = frame[(frame["method"] == row.name) & (frame["column"] == column)]
            if part.empty:
                continue
            runs = tuning_and_table(part, preset.tune_seeds, preset.tune_axes)
            lam, swept = _chosen(runs)
            at = runs.table[runs.table["lam"] == lam]
            swept_lams = runs.tuning["lam"].tolist()  # the runs that chose λ
            test = at["test"].to_numpy(float)
            ok = test[np.isfinite(test)]
            n = len(ok)
            mean = float(ok.mean()) if n else math.nan
            sem = float(ok.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            pub, spread = row.published.get(column, (math.nan, math.nan))
            diff = mean - pub
            bound = 2 * math.sqrt(np.nan_to_num(sem) ** 2 + np.nan_to_num(spread) ** 2)
            counted, expected = _counted(part, runs, lam, preset)
            partial = counted < expected  # λ and seeds still missing: not read as a result
            rows.append(
                {
                    "method": row.name,
                    "column": column,
                    "label": preset.label(column),
                    "lam": lam,
                    "reads_lam": bool(at["reads_lam"].any()),
                    "lam_chosen_on_val": swept,
                    "lams": len(set(swept_lams)),
                    "edge": sweep_edge(lam, swept_lams) if swept and not partial else "",
                    "runs": counted,
                    "expected": expected,
                    "seeds": n,
                    "diverged": int(len(test) - n),
                    "mean": mean,
                    "sem": sem,
                    "published": pub,
                    "published_spread": spread,
                    "diff": diff,
                    "marked": bool(
                        not partial
                        and math.isfinite(diff)
                        and abs(diff) > MIN_POINTS
                        and abs(diff) > bound
                    ),
                }
            )
    return pd.DataFrame(rows)


def _counted(part: pd.DataFrame, runs: CellRuns, lam: float, preset: PeerPreset) -> tuple[int, int]:
    """(runs stored that count, runs the cell has once complete) of one cell at its λ: with
    tuning seeds or ``tune_axes``, the tuning runs and one table run per seed at ``lam`` (a
    tuning run at ``lam`` stands for its seed where it is also a table run)."""
    expected = int(part["expected"].iloc[0]) if "expected" in part else len(part)
    if not preset.tune_seeds and not preset.tune_axes:
        return len(part), expected
    at = runs.table[runs.table["lam"] == lam]
    if runs.shared:
        at = at[~at["seed"].isin(runs.tuning["seed"].unique())]
    return len(runs.tuning) + at["seed"].nunique(), expected


def _at_chosen(
    frame: pd.DataFrame, method: str, column: str, preset: PeerPreset
) -> pd.Series | None:
    """{seed: test accuracy} of one cell's table runs at its λ (finite values only), or None
    (also for a partial cell: its λ or seeds are not all stored)."""
    part = frame[(frame["method"] == method) & (frame["column"] == column)]
    if part.empty:
        return None
    runs = tuning_and_table(part, preset.tune_seeds, preset.tune_axes)
    lam, _ = _chosen(runs)
    counted, expected = _counted(part, runs, lam, preset)
    if counted < expected:
        return None
    table = runs.table
    at = table[(table["lam"] == lam) & np.isfinite(table["test"].to_numpy(float))]
    series: pd.Series = at.set_index("seed")["test"]
    return series


def paired_table(frame: pd.DataFrame, preset: PeerPreset) -> pd.DataFrame:
    """Per column and row other than the preset's ``reference``: the paired difference
    (row − reference, points) over the seeds both have, its 95 % CI and p (module
    docstring); empty without a reference. Partial cells are left out."""
    rows: list[dict[str, Any]] = []
    if not preset.reference:
        return pd.DataFrame(rows)
    for column in preset.columns:
        base = _at_chosen(frame, preset.reference, column, preset)
        if base is None:
            continue
        for row in preset.rows:
            if row.name == preset.reference:
                continue
            other = _at_chosen(frame, row.name, column, preset)
            if other is None:
                continue
            seeds = sorted(set(base.index) & set(other.index))
            test = paired_test(other.loc[seeds].tolist(), base.loc[seeds].tolist())
            rows.append({"column": column, "label": preset.label(column), "method": row.name,
                         "reference": preset.reference, "pairs": len(seeds),
                         "diff": test["mean_diff"], "ci_low": test["ci_low"],
                         "ci_high": test["ci_high"], "p": test["p"]})  # fmt: skip
    return pd.DataFrame(rows)


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
            "p": "—" if not math.isfinite(r["p"]) else f"{r['p']:.3f}",
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


def _number(mean: float, spread: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.2f}" + ("" if not math.isfinite(spread) else f" ± {spread:.2f}")


def _lam_text(r: Mapping[str, Any]) -> str:
    if not r.get("reads_lam", True):
        return "no λ"
    lam = float(r["lam"])
    text = "0" if lam == 0 else f"{lam:.0e}".replace("e+0", "e").replace("e+", "e")
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


def task1_states(frame: pd.DataFrame) -> tuple[int, int, int]:
    """(groups of runs with the same task-1 settings that started from more than one task-1
    state, groups, runs in those groups). Runs of one group share one state where one machine
    trained it once (the grid caches it), so their accuracies after task 1 agree to the last
    digit and so do their states' fingerprints (``task1_state``, in records that hold one);
    a difference in either means states that differ, at least in float rounding."""
    runs = frame.drop_duplicates("run_id")
    runs = runs[runs["after_task1"] != ""] if "after_task1" in runs else runs.iloc[:0]
    if runs.empty:
        return 0, 0, 0
    states = runs.groupby("task1")["after_task1"].nunique()
    if "task1_state" in runs:
        prints = runs[runs["task1_state"] != ""].groupby("task1")["task1_state"].nunique()
        states = states.combine(prints, max, fill_value=0)
    mixed = states[states > 1].index
    return len(mixed), len(states), int(runs["task1"].isin(mixed).sum())


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
    "MARK",
    "compute_note",
    "held_configs",
    "paired_markdown",
    "paired_table",
    "peer_figure",
    "peer_frame",
    "peer_markdown",
    "peer_table",
    "task1_note",
    "task1_states",
    "tuning_and_table",
    "val_average",
    "write_outputs",
]
