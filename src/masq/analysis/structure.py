"""Does the Fisher's off-diagonal part change what consolidation achieves? (``masq analyze
kfac``)

The paper's thesis is that the Fisher of a trained network is nearly diagonal, so a diagonal
importance suffices. Table 2 measures the off-diagonal mass; this analysis measures what it
is worth: EWC with the same Fisher in three structures, each at its own best λ,

- ``diagonal``: F_kk only (the paper's FIM, :func:`masq.importance.fisher`);
- ``K-FAC``: per Linear layer G ⊗ A (Kronecker factors, :mod:`masq.importance.kfac`);
- ``blocks``: the exact Fisher within each layer, every off-diagonal entry of the layer's
  [W | b] block (:mod:`masq.importance.kfac`, low-rank form; on small nets),

and MaSQ (``mean``, on all samples) beside them. The three Fisher structures use the same
labels (``exact`` by default: the Fisher of the model's predictive distribution) on the same
seeded subset of ``fisher_samples`` training samples of each task (the subset is drawn first
from the run's "fisher-labels" stream, so it is the same for every structure), so they differ
in structure only.

Per SLT and measure, λ is chosen on the validation sets (mean over seeds of the "last"
accuracy on the union of all tasks' validation sets) and reported on the test sets: the mean
and std over seeds there, and a paired t-test (pairs: the same seed, hence the same task-1
state) of each structure against the diagonal at its own best λ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masq.analysis.common import (
    EDGE_MARKS,
    edge_note,
    fmt,
    lam_on_validation,
    markdown,
    records,
    sweep_edge,
    tuning_runs,
    write_analysis_files,
)
from masq.analysis.paired import paired_test
from masq.config import RunConfig
from masq.consolidation import canonical
from masq.errors import ConfigError
from masq.runid import run_id

# The measures compared, by their name in the tables, as RunConfig changes ({} of the
# Fisher's settings are filled in by :func:`structure_configs`).
DIAGONAL = "diagonal FIM"
BLOCKS = "FIM blocks"
STRUCTURES: dict[str, dict[str, Any]] = {
    DIAGONAL: {"importance": "fisher"},
    "K-FAC": {"importance": "kfac"},
    BLOCKS: {"importance": "fisher-blocks"},
    "MaSQ (mean)": {"importance": "masq", "scale": "mean"},
}
NONE = "no EWC"
COLOURS: dict[str, str] = {
    DIAGONAL: "tab:blue",
    "K-FAC": "tab:green",
    BLOCKS: "tab:purple",
    "MaSQ (mean)": "tab:red",
    NONE: "0.5",
}
SELECT = "last_val.val_union"  # λ chosen on the validation accuracy ...
REPORT = "last.union"  # ... and reported on the test sets


def structure_of(config: Mapping[str, Any]) -> str:
    """The name in :data:`STRUCTURES` of a run's measure (``NONE`` for no importance or λ = 0)."""
    importance = str(config.get("importance"))
    if importance == "none" or float(config.get("lam", 0.0)) == 0:
        return NONE
    for name, changes in STRUCTURES.items():
        if changes["importance"] == importance:
            return name
    return importance


def structure_configs(
    base: RunConfig,
    lams: Sequence[float],
    seeds: int,
    *,
    measures: Sequence[str] = tuple(STRUCTURES),
    labels: str = "exact",
    samples: int = 1000,
) -> list[RunConfig]:
    """Every run of one SLT's comparison: for seeds 0..seeds-1, λ = 0 (no EWC) and each of
    ``measures`` (names of :data:`STRUCTURES`) at every λ of ``lams``; the Fisher structures
    with ``fisher_labels=labels`` on ``fisher_samples=samples``. ``base`` holds everything
    else (SLT, architecture, ε2, iterations, ``eval_val`` is switched on). Canonical, without
    duplicates."""
    unknown = [m for m in measures if m not in STRUCTURES]
    if unknown:
        raise ConfigError(
            f"analyze kfac: unknown measures {unknown}; use some of {list(STRUCTURES)}"
        )
    if seeds < 1:
        raise ConfigError(f"analyze kfac: --seeds must be >= 1, got {seeds}")
    out: dict[str, RunConfig] = {}
    for seed in range(seeds):
        first = base.with_(seed=seed, eval_val=True)
        runs = [first.with_(importance="none", lam=0.0)]
        for name in measures:
            changes = dict(STRUCTURES[name])
            if changes["importance"] != "masq":
                changes |= {"fisher_labels": labels, "fisher_samples": samples}
            runs += [first.with_(**changes, lam=float(lam)) for lam in lams]
        for config in runs:
            config = canonical(config)
            out.setdefault(run_id(config), config)
    return list(out.values())


def lam_window(lams: Sequence[float], centre: float, decades: int) -> list[float]:
    """The λ of ``lams`` within ``decades`` decades of ``centre``: |log10(λ / centre)| ≤
    decades (the blocks' sweep around the diagonal FIM's best λ, whose diagonal they share)."""
    if not centre > 0:
        raise ConfigError(f"analyze kfac: the window needs a centre λ > 0, got {centre}")
    return [lam for lam in lams if abs(math.log10(lam / centre)) <= decades + 1e-9]


def chosen_lambda(
    frame: pd.DataFrame, measure: str = DIAGONAL, tune_seeds: int = 0
) -> dict[tuple[str, str, str], float]:
    """{(slt, hidden, scenario): the λ of ``measure`` chosen on validation} (mean over the
    seeds stored, or over the ``tune_seeds`` smallest of them; the smallest λ on ties), for
    the groups where it has runs."""
    out = {}
    part = frame[frame["measure"] == measure]
    for key, rows in part.groupby(["slt", "hidden", "scenario"], sort=False):
        out[(str(key[0]), str(key[1]), str(key[2]))] = _winner(rows, tune_seeds)[0]
    return out


def structure_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per stored run: slt, hidden, scenario, measure (:func:`structure_of`), λ, seed,
    the validation and test "last" accuracy on the union of all tasks."""
    if df.empty:
        raise ConfigError("no stored runs for the comparison; run `masq analyze kfac` first")
    missing = [c for c in (SELECT, REPORT) if c not in df.columns]
    if missing:
        raise ConfigError(
            f"the stored runs have no {missing} metrics; they were run without --eval-val: "
            "run `masq analyze kfac` (it evaluates the validation sets)"
        )
    rows = records(df)
    scenario = df["scenario"] if "scenario" in df.columns else pd.Series(["class"] * len(df))
    return pd.DataFrame(
        {
            "slt": df["slt"].to_numpy(),
            "hidden": df["hidden"].astype(str).to_numpy(),
            "scenario": scenario.fillna("class").astype(str).to_numpy(),
            "measure": [structure_of(r) for r in rows],
            "lam": df["lam"].astype(float).to_numpy(),
            "seed": df["seed"].astype(int).to_numpy(),
            "val": df[SELECT].astype(float).to_numpy(),
            "test": df[REPORT].astype(float).to_numpy(),
        }
    )


def _winner(part: pd.DataFrame, tune_seeds: int = 0) -> tuple[float, pd.DataFrame]:
    """(λ with the highest mean validation accuracy over seeds (the ``tune_seeds`` smallest
    ones, :func:`masq.analysis.common.tuning_runs`), smallest on ties; its rows, of every
    seed, with a finite test accuracy). Diverged runs (NaN accuracies) are left out of the
    means, and a λ whose every run diverged is never chosen; a group where all diverged gives
    NaN."""
    lam = lam_on_validation(tuning_runs(part, tune_seeds))
    if math.isnan(lam):
        return math.nan, part.iloc[0:0]
    at = part[part["lam"] == lam]
    return lam, at[np.isfinite(at["test"].to_numpy(float))]


def structure_table(frame: pd.DataFrame, tune_seeds: int = 0) -> pd.DataFrame:
    """Per (slt, hidden, scenario, measure): the λ chosen on validation (over the
    ``tune_seeds`` smallest seeds where given, else every seed; and whether it is at an edge
    of the λ swept, :func:`sweep_edge`), the number of seeds, the test accuracy's mean and std
    over seeds there, and against the diagonal FIM at its own chosen λ the paired difference
    (mean, 95 % CI) and two-sided p."""
    rows = []
    keys = ["slt", "hidden", "scenario"]
    for key, part in frame.groupby(keys, sort=False):
        chosen = {m: _winner(p, tune_seeds) for m, p in part.groupby("measure", sort=False)}
        base = chosen.get(DIAGONAL)
        for measure in [*STRUCTURES, NONE]:
            if measure not in chosen:
                continue
            lam, at = chosen[measure]
            if at.empty:
                continue  # every run of this measure diverged
            test = at.sort_values("seed")["test"]
            mine = tuning_runs(part[part["measure"] == measure], tune_seeds)
            swept = mine.loc[mine["lam"] > 0, "lam"]
            row = dict(zip(keys, key, strict=True)) | {
                "measure": measure,
                "lam": lam,
                "edge": sweep_edge(lam, swept.tolist()),
                "seeds": len(at),
                "test_mean": float(test.mean()),
                "test_std": float(test.std(ddof=1)) if len(at) > 1 else math.nan,
                "val_mean": float(at["val"].mean()),
            }
            if base is not None and measure != DIAGONAL:
                a = at.set_index("seed")["test"]
                b = base[1].set_index("seed")["test"]
                common = sorted(set(a.index) & set(b.index))
                test_ab = paired_test(a.loc[common].tolist(), b.loc[common].tolist())
                row |= {
                    "diff": test_ab["mean_diff"],
                    "ci_low": test_ab["ci_low"],
                    "ci_high": test_ab["ci_high"],
                    "p": test_ab["p"],
                }
            rows.append(row)
    return pd.DataFrame(rows)


def _pp(x: float) -> str:
    """A fraction as signed percentage points ("+0.42"), "–" for NaN."""
    return "–" if not math.isfinite(x) else f"{100 * x:+.2f}"


def structure_markdown(table: pd.DataFrame) -> str:
    """:func:`structure_table` as Markdown: accuracies in %, differences in points."""
    records = []
    for r in table.to_dict("records"):
        std = r["test_std"]
        records.append(
            {
                "slt": r["slt"],
                "net": f"784-{r['hidden']}-10",
                "scenario": r["scenario"],
                "measure": r["measure"],
                "lam": (fmt(r["lam"], 2) if r["lam"] else "0")
                + EDGE_MARKS.get(str(r.get("edge") or ""), ""),
                "acc": f"{100 * r['test_mean']:.2f}"
                + ("" if not math.isfinite(std) else f" ± {100 * std:.2f}"),
                "seeds": r["seeds"],
                "diff": _pp(r.get("diff", math.nan)),
                "ci": "–"
                if not math.isfinite(r.get("ci_low", math.nan))
                else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]",
                "p": "–" if not math.isfinite(r.get("p", math.nan)) else f"{r['p']:.3f}",
            }
        )
    columns = [
        ("slt", "SLT"),
        ("net", "net"),
        ("scenario", "scenario"),
        ("measure", "measure"),
        ("lam", "λ (chosen on val)"),
        ("acc", "test ACC % (mean ± std)"),
        ("seeds", "seeds"),
        ("diff", "− diagonal (pp)"),
        ("ci", "95 % CI"),
        ("p", "paired p"),
    ]
    title = (
        "EWC with the Fisher in three structures and MaSQ, each at its own λ chosen on the "
        "validation sets; test accuracy on the union of all tasks after the last one; "
        "differences paired by seed against the diagonal FIM."
    )
    text = markdown(records, columns, title)
    if any(str(r.get("edge") or "") for r in table.to_dict("records")):
        text += EDGE_NOTE
    return text


EDGE_NOTE = edge_note("extend the sweep (--lam-max / --lam-min)")


def structure_figure(table: pd.DataFrame) -> Figure:
    """One panel per (SLT, net, scenario): test accuracy per measure (mean ± std over seeds)
    at its chosen λ, the no-EWC run as a dashed line."""
    groups = list(table.groupby(["slt", "hidden", "scenario"], sort=False))
    fig = Figure(figsize=(3.2 * max(1, len(groups)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(groups)), squeeze=False)[0])
    for ax, ((slt, hidden, scenario), part) in zip(axes, groups, strict=False):
        bars = part[part["measure"] != NONE]
        xs = np.arange(len(bars))
        ax.bar(
            xs,
            100 * bars["test_mean"].to_numpy(float),
            yerr=100 * np.nan_to_num(bars["test_std"].to_numpy(float)),
            color=[COLOURS.get(m, "0.3") for m in bars["measure"]],
            capsize=3,
        )
        none = part[part["measure"] == NONE]
        if not none.empty:
            ax.axhline(100 * float(none["test_mean"].iloc[0]), color="0.3", linestyle="--",
                       linewidth=1, label="no EWC")  # fmt: skip
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(xs, list(bars["measure"]), rotation=30, ha="right", fontsize=8)
        low = 100 * float(np.nanmin(part["test_mean"].to_numpy(float)))
        ax.set_ylim(max(0.0, low - 10), 100)
        ax.set_title(f"{slt}, 784-{hidden}-10, {scenario}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("test ACC % (union of all tasks)")
    return fig


def lambda_figure(
    frame: pd.DataFrame, table: pd.DataFrame | None = None, tune_seeds: int = 0
) -> Figure:
    """One panel per (SLT, net, scenario): mean test accuracy over seeds against λ (log axis)
    per measure, the validation mean dotted, no EWC as a dashed line: where each structure's
    λ lies and how flat its optimum is. With ``tune_seeds`` the lines are the sweep on the
    tuning seeds alone (:func:`masq.analysis.common.tuning_runs`; a mean over other seeds at
    one λ would make a step in them), and each measure's row of ``table`` (every seed at its
    chosen λ) is a diamond with its std over seeds."""
    groups = list(frame.groupby(["slt", "hidden", "scenario"], sort=False))
    fig = Figure(figsize=(4.2 * max(1, len(groups)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(groups)), squeeze=False)[0])
    for ax, ((slt, hidden, scenario), part) in zip(axes, groups, strict=False):
        for measure in STRUCTURES:
            rows = tuning_runs(part[part["measure"] == measure], tune_seeds)
            if rows.empty:
                continue
            means = rows.groupby("lam")[["test", "val"]].mean().sort_index()
            colour = COLOURS.get(measure, "0.3")
            lams = means.index.to_numpy(float)
            ax.plot(lams, 100 * means["test"].to_numpy(float), marker="o", markersize=3,
                    color=colour, label=measure)  # fmt: skip
            ax.plot(lams, 100 * means["val"].to_numpy(float), linestyle=":", color=colour)
            if tune_seeds and table is not None:
                mine = table[(table["slt"] == slt) & (table["hidden"] == hidden)
                             & (table["scenario"] == scenario)
                             & (table["measure"] == measure)]  # fmt: skip
                for _, r in mine.iterrows():
                    std = 100 * np.nan_to_num(float(r["test_std"]))
                    ax.errorbar([float(r["lam"])], [100 * float(r["test_mean"])], yerr=[std],
                                marker="D", markersize=5, color=colour, capsize=3)  # fmt: skip
        none = part[part["measure"] == NONE]
        if not none.empty:
            ax.axhline(100 * float(none["test"].mean()), color="0.3", linestyle="--",
                       linewidth=1, label="no EWC")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_title(f"{slt}, 784-{hidden}-10, {scenario}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("ACC % after the last task (test; val dotted)")
    if tune_seeds:
        fig.suptitle(f"lines: the sweep on the {tune_seeds} tuning seed(s); ◆: every seed at "
                     "the λ chosen on validation (± std)", fontsize=9)  # fmt: skip
    axes[-1].legend(fontsize=7, loc="best")
    return fig


def write_outputs(
    table: pd.DataFrame,
    frame: pd.DataFrame,
    out: str | Path,
    *,
    body: Mapping[str, Any],
    tune_seeds: int = 0,
) -> tuple[str, list[Path]]:
    """Write ``out``/kfac.md and .csv (:func:`structure_table`), kfac_points.csv (every run),
    kfac.png (:func:`structure_figure`), kfac_lambda.png (:func:`lambda_figure`) and the
    manifest kfac.json (``body`` plus files and provenance); (the Markdown,
    the paths written)."""
    md = structure_markdown(table)
    figures = [("kfac.png", structure_figure(table)),
               ("kfac_lambda.png", lambda_figure(frame, table, tune_seeds))]  # fmt: skip
    written = write_analysis_files(out, "kfac", md, table, frame, figures, body)
    return md, written


__all__ = [
    "BLOCKS",
    "DIAGONAL",
    "NONE",
    "STRUCTURES",
    "chosen_lambda",
    "lam_window",
    "lambda_figure",
    "structure_configs",
    "structure_figure",
    "structure_frame",
    "structure_markdown",
    "structure_of",
    "structure_table",
    "write_outputs",
]
