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

The table's Markdown, figure and files: :mod:`masq.analysis.peer_files`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import pandas as pd

from masq.analysis.common import lam_on_validation, sweep_edge, tuning_runs
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


__all__ = [
    "MARK",
    "held_configs",
    "paired_table",
    "peer_frame",
    "peer_table",
    "task1_states",
    "tuning_and_table",
    "val_average",
]
