"""What λ does each importance measure need? The λ sweep.

For an SLT at one architecture and ε2, every run starts from the same task-1 state and is
re-trained on the later task with EWC at λ ∈ {λ_lo · 10^(k/m)} up to λ_hi (m points per
decade; :func:`lam_grid`), once per importance (by default the paper's: FIM; MaSQ ``mean``;
MaSQ ``sum``; any registered measure with ``measures=``), plus one run with λ = 0. It is a
grid (:func:`sweep_grid`, run by :func:`masq.grid.execute`: shared task-1 state and
importance passes, stacked re-training, resumable result store).

:func:`sweep_frame` reads the store: per (SLT, method, λ) the mean and std over seeds of the
"best" and "last" accuracy on the union of all tasks. :func:`needed_lambda` answers the
question: per method, the λ with the highest mean accuracy and the range of λ within a
tolerance of it.
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

from masq.analysis.common import markdown, provenance, records, write_manifest
from masq.config import RunConfig, lam_per_lr2, round_sig
from masq.consolidation import method_label
from masq.errors import ConfigError
from masq.fileio import atomic_write, save_png
from masq.grid import expand, grid_from_mapping, load_preset
from masq.runid import run_id

# The other reading of the paper's λ grid: c / ε2 (the paper's setting).
PAPER_LAM_PER_LR2: tuple[float, ...] = (0.1, 1.0, 10.0)
# The curves of a sweep, in drawing order, and their colours.
METHODS: tuple[str, ...] = ("EWC+FIM", "EWC+MaSQ (mean)", "EWC+MaSQ (sum)")
COLOURS: dict[str, str] = {
    "EWC+FIM": "tab:blue",
    "EWC+MaSQ (mean)": "tab:red",
    "EWC+MaSQ (sum)": "tab:orange",
}
NO_EWC = "no EWC"
# Colours of the curves of other measures, in order.
EXTRA_COLOURS: tuple[str, ...] = ("tab:green", "tab:purple", "tab:brown", "tab:pink",
                                  "tab:olive", "tab:cyan", "tab:gray")  # fmt: skip


def curve_order(part: pd.DataFrame) -> list[str]:
    """The methods of a sweep to draw: the paper's three first (:data:`METHODS`), then the
    others sorted; never "no EWC" (a horizontal line)."""
    present = [m for m in dict.fromkeys(part["method"]) if m != NO_EWC]
    return [m for m in METHODS if m in present] + sorted(m for m in present if m not in METHODS)


def paper_lams(lr2: float) -> tuple[list[float], list[float]]:
    """The paper's λ grid at ε2 = ``lr2`` in both readings: (absolute λ > 0 of the ``paper``
    preset, c / ε2 for c in :data:`PAPER_LAM_PER_LR2`)."""
    absolute = [float(v) for v in load_preset("paper").lam if v > 0]
    return absolute, [lam_per_lr2(c, lr2) for c in PAPER_LAM_PER_LR2]


# The most λ values a sweep may have: each is one re-training run per measure and seed (three
# measures by default), so 1,000 values are already 3,000 runs; more is a typo (--per-decade
# 1e6 would build twelve million values before running anything).
MAX_LAMS = 1_000


def lam_count(lo: float, hi: float, per_decade: int) -> int:
    """How many λ :func:`lam_grid` gives, after checking its arguments (one-line ConfigErrors
    naming the flag at fault: --lam-min, --lam-max, --per-decade)."""
    if not (lo > 0 and math.isfinite(lo)):
        raise ConfigError(f"--lam-min must be a positive finite number, got {lo}")
    if not math.isfinite(hi):
        raise ConfigError(f"--lam-max must be a finite number, got {hi}")
    if hi < lo:
        raise ConfigError(f"--lam-max ({hi:g}) must be at least --lam-min ({lo:g})")
    if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
        raise ConfigError(f"--per-decade must be >= 1, got {per_decade}")
    return math.floor(round(per_decade * math.log10(hi / lo), 9)) + 1


def lam_grid(lo: float = 1.0, hi: float = 1e12, per_decade: int = 2) -> list[float]:
    """λ = lo · 10^(k / per_decade) for k = 0, 1, ... while ≤ hi (12 significant digits); at
    most :data:`MAX_LAMS` values, refused before any is made."""
    n = lam_count(lo, hi, per_decade)
    if n > MAX_LAMS:
        raise ConfigError(
            f"--per-decade {per_decade} from --lam-min {lo:g} to --lam-max {hi:g} gives {n:,} "
            f"λ values, above the limit of {MAX_LAMS:,}; give fewer per decade or a narrower range"
        )
    return [round_sig(lo * 10 ** (k / per_decade)) for k in range(n)]


def sweep_grid(
    slt: str,
    hidden: Sequence[int],
    lr2: float,
    lams: Sequence[float],
    *,
    seeds: int = 1,
    base: Mapping[str, Any] | None = None,
    measures: Sequence[str] = ("fisher", "masq"),
) -> Any:
    """The grid of one SLT's sweep: λ ∈ {0} ∪ ``lams``, importance over ``measures`` (any
    registered measure; the default is the paper's FIM and MaSQ), scale mean | sum (read by
    MaSQ only: the grid drops the duplicates of the others), seeds 0..seeds-1; ``base`` sets
    any other axis (one value each, e.g. iters1, fisher_labels)."""
    values: dict[str, Any] = dict(base or {})
    values.update(
        slt=slt,
        hidden=[list(hidden)],
        lr2=lr2,
        lam=[0.0, *lams],
        importance=list(measures),
        scale=["mean", "sum"],
        seeds=seeds,
    )
    return grid_from_mapping(values, where="λ sweep")


def sweep_configs(grids: Sequence[Any]) -> list[RunConfig]:
    """Every run of ``grids`` (:func:`masq.grid.expand`), duplicates dropped."""
    seen: set[str] = set()
    out = []
    for grid in grids:
        for config in expand(grid):
            rid = run_id(config)
            if rid not in seen:
                seen.add(rid)
                out.append(config)
    return out


def sweep_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per (slt, hidden, lr2, method, λ) over seeds: ``best_mean``, ``best_std``,
    ``last_mean``, ``last_std`` (accuracy on the union of all tasks during the final phase),
    ``seeds`` and ``diverged``; ``method`` is :func:`masq.consolidation.method_label` ("no
    EWC" for λ = 0). Diverged runs and NaN accuracies (:func:`masq.report.tables.spoiled`'s
    rule: ``meta.diverged`` set or a NaN accuracy) are never averaged in: ``seeds`` counts
    every run, ``diverged`` those left out; a point whose runs all diverged has NaN means."""
    if df.empty:
        raise ConfigError("no stored runs for the λ sweep; run `masq analyze lambda` first")
    bad = pd.Series(False, index=df.index)
    if "diverged" in df.columns:
        bad |= df["diverged"].fillna("").astype(str) != ""
    for column in ("best.union", "last.union"):
        bad |= pd.to_numeric(df[column], errors="coerce").isna()
    data = df.assign(method=[method_label(r) for r in df.to_dict("records")], _bad=bad.astype(int))
    data.loc[bad, ["best.union", "last.union"]] = math.nan  # never averaged in
    keys = ["slt", "hidden", "lr2", "method", "lam"]
    grouped = data.groupby(keys, sort=True)
    out = pd.DataFrame(
        {
            "best_mean": grouped["best.union"].mean(),
            "best_std": grouped["best.union"].std(ddof=1),
            "last_mean": grouped["last.union"].mean(),
            "last_std": grouped["last.union"].std(ddof=1),
            "seeds": grouped.size(),
            "diverged": grouped["_bad"].sum().astype(int),
        }
    )
    return out.reset_index()


def needed_lambda(frame: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """Per (slt, method, criterion): ``lam_best`` (the λ with the highest mean accuracy, the
    smallest on ties), ``acc`` there, ``lam_lo``..``lam_hi`` (the smallest and largest λ whose
    mean is within ``tolerance`` of it) and ``acc_lam0`` (the λ = 0 run's mean)."""
    rows = []
    for (slt, method), part in frame[frame["method"] != NO_EWC].groupby(["slt", "method"]):
        zero = frame[(frame["slt"] == slt) & (frame["method"] == NO_EWC)]
        for criterion in ("best", "last"):
            col = f"{criterion}_mean"
            part_sorted = part[part[col].notna()].sort_values("lam", kind="mergesort")
            if part_sorted.empty:  # every λ of this method diverged: nothing to choose
                continue
            top = part_sorted[col].max()
            winner = part_sorted[part_sorted[col] == top].iloc[0]
            near = part_sorted[part_sorted[col] >= top - tolerance]
            rows.append(
                {
                    "slt": slt,
                    "method": method,
                    "criterion": criterion,
                    "lam_best": float(winner["lam"]),
                    "acc": float(top),
                    "lam_lo": float(near["lam"].min()),
                    "lam_hi": float(near["lam"].max()),
                    "acc_lam0": float(zero[col].iloc[0]) if not zero.empty else math.nan,
                }
            )
    return pd.DataFrame(rows)


NEEDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("slt", "SLT"),
    ("method", "method"),
    ("criterion", "criterion"),
    ("lam_best", "best λ"),
    ("acc", "accuracy there"),
    ("lam_lo", "λ within tolerance: from"),
    ("lam_hi", "to"),
    ("acc_lam0", "accuracy with λ = 0"),
)


def needed_markdown(needed: pd.DataFrame, tolerance: float = 0.01) -> str:
    """:func:`needed_lambda` as Markdown (accuracies as fractions)."""
    title = (
        f"λ each measure needs: the λ of the highest mean accuracy on the union of all tasks, "
        f"and the λ range within {100 * tolerance:g} point(s) of it."
    )
    return markdown(records(needed), list(NEEDED_COLUMNS), title)


def sweep_figure(frame: pd.DataFrame, slt: str, *, title: str = "") -> Figure:
    """One SLT's sweep: "best" and "last" accuracy on the union of all tasks against λ (log
    axis), one curve per method (mean over seeds, a ±std band with several seeds), λ = 0 as a
    horizontal line, the paper's λ grid marked in both readings."""
    part = frame[frame["slt"] == slt]
    if part.empty:
        raise ConfigError(f"no λ-sweep runs for {slt!r}")
    lr2 = float(part["lr2"].iloc[0])
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    absolute, relative = paper_lams(lr2)
    for ax, criterion in zip(axes, ("best", "last"), strict=True):
        mean, std = f"{criterion}_mean", f"{criterion}_std"
        for i, lam in enumerate(absolute):
            ax.axvline(
                lam,
                color="0.55",
                linestyle=":",
                linewidth=1,
                label="paper grid, λ absolute" if i == 0 else None,
            )
        for i, lam in enumerate(relative):
            ax.axvline(
                lam,
                color="0.55",
                linestyle="-.",
                linewidth=1,
                label="paper grid, λ = c/ε2" if i == 0 else None,
            )
        zero = part[part["method"] == NO_EWC]
        if not zero.empty:
            ax.axhline(
                float(zero[mean].iloc[0]),
                color="black",
                linestyle="--",
                linewidth=1.2,
                label="no EWC (λ = 0)",
            )
        for k, method in enumerate(curve_order(part)):
            rows = part[part["method"] == method].sort_values("lam")
            colour = COLOURS.get(method, EXTRA_COLOURS[k % len(EXTRA_COLOURS)])
            xs, ys = rows["lam"].to_numpy(float), rows[mean].to_numpy(float)
            ax.plot(xs, ys, marker="o", markersize=3, color=colour, label=method)
            sd = rows[std].to_numpy(float)
            if np.isfinite(sd).any():
                sd = np.nan_to_num(sd)
                ax.fill_between(xs, ys - sd, ys + sd, color=colour, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_title(f'"{criterion}" accuracy on the union of all tasks')
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8, loc="best")
    hidden = part["hidden"].iloc[0]
    seeds = int(part["seeds"].max())
    fig.suptitle(
        title or f"{slt}: λ sweep, 784-{hidden}-10, ε2 = {lr2:g}, {seeds} seed(s)", fontsize=10
    )
    return fig


def shown_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``frame`` for a table: a mean with no value because every run there
    diverged reads "diverged" (never a number, never "—")."""
    rows = records(frame)
    for row in rows:
        for key in ("best_mean", "last_mean"):
            if row.get("diverged") and not row[key] == row[key]:
                row[key] = "diverged"
    return rows


def sweep_markdown(frame: pd.DataFrame) -> str:
    """The sweep's numbers as Markdown (one row per SLT, method and λ; runs left out of the
    means as diverged in their own column)."""
    cols = [
        ("slt", "SLT"),
        ("method", "method"),
        ("lam", "λ"),
        ("best_mean", "best"),
        ("best_std", "± std"),
        ("last_mean", "last"),
        ("last_std", "± std"),
        ("seeds", "seeds"),
        ("diverged", "diverged"),
    ]
    return markdown(shown_rows(frame), cols)


def write_outputs(
    frame: pd.DataFrame, out: str | Path, *, tolerance: float, body: Mapping[str, Any]
) -> tuple[str, list[Path]]:
    """Write ``out``/lambda_<SLT>.png per SLT, lambda.md/.csv (every point), lambda_needed.md/
    .csv (:func:`needed_lambda`) and the manifest lambda.json (``body`` plus the files and
    provenance); (the "λ needed" Markdown table, the paths written)."""
    out = Path(out)
    needed = needed_lambda(frame, tolerance)
    needed_md = needed_markdown(needed, tolerance)
    written, figures = [], []
    for slt in dict.fromkeys(frame["slt"]):
        name = f"lambda_{str(slt).replace('/', '_')}.png"
        written.append(save_png(sweep_figure(frame, str(slt)), out / name))
        figures.append(name)
    written += [
        atomic_write(out / "lambda.md", sweep_markdown(frame)),
        atomic_write(out / "lambda.csv", frame.to_csv(index=False)),
        atomic_write(out / "lambda_needed.md", needed_md),
        atomic_write(out / "lambda_needed.csv", needed.to_csv(index=False)),
    ]
    files = {
        "markdown": "lambda.md",
        "csv": "lambda.csv",
        "needed_markdown": "lambda_needed.md",
        "needed_csv": "lambda_needed.csv",
        "figures": figures,
    }
    manifest = {**body, "tolerance": tolerance, "provenance": provenance(), "files": files}
    written.append(write_manifest(out, "lambda", manifest))
    return needed_md, written
