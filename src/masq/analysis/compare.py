"""FIM versus MaSQ at trained task-1 states (the paper's §5.4, and what it did not measure).

For one state and task 1's training data (N samples, batches of B_MaSQ), per tensor:

- the maxima of the FIM F_k = (1/N) Σ_n g_nk² (true, sampled and exact labels) and of MaSQ
  M_k = (1/K) Σ_b ḡ_bk² (``mean``) and B·M_k (``sum``), as in the paper's Figs 6-8;
- ``mean_ratio`` = mean_k F_k / mean_k M_k (MaSQ ``mean``; divide by B for ``sum``);
- ``spearman``: the rank correlation of F and M over the tensor's entries (Pearson's
  correlation of their average ranks; NaN where either is constant, e.g. all zero);
- ``top_overlap``: the share of the FIM's top-q entries that are also among MaSQ's top-q;
- ``cancel_share``: the share of the FIM's top-q entries whose per-sample gradients cancel
  within the batches more than chance: B·M_k < r·F_k (MaSQ in the ``sum`` scale, B·M_k for
  equal batches; default r = 0.1). B·M_k ≈ F_k for independent gradients of random sign
  (the chance level), up to B·F_k for gradients that agree, 0 for exact cancellation; by
  Jensen M_k ≤ F_k. (Comparing M_k itself with F_k would call every entry cancelling: M_k is
  about F_k / B even for gradients of random sign.)

Top-q sets (:func:`top_set`): k = ⌈q·P⌉ (at least 1) entries, ties at the k-th largest value
included, zeros excluded (an all-zero tensor has no top entries).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from masq import importance
from masq.analysis.common import markdown, provenance, write_manifest
from masq.config import RunConfig, hidden_text
from masq.errors import ConfigError
from masq.fileio import atomic_write, save_png
from masq.protocol import labels_stream, stream_seed

# The measures computed at each state, by label (FIM with its label source, MaSQ with its scale).
MEASURES: tuple[str, ...] = ("FIM", "FIM (sampled)", "FIM (exact)", "MaSQ mean", "MaSQ sum")
COMPARE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("slt", "SLT"),
    ("tensor", "tensor"),
    ("num_params", "P"),
    ("max_FIM", "max FIM"),
    ("max_FIM (sampled)", "max FIM sampled"),
    ("max_FIM (exact)", "max FIM exact"),
    ("max_MaSQ mean", "max MaSQ mean"),
    ("max_MaSQ sum", "max MaSQ sum"),
    ("mean_ratio", "mean FIM / mean MaSQ"),
    ("spearman", "Spearman ρ"),
    ("top_overlap", "top-q overlap"),
    ("cancel_share", "cancelling share"),
)


# ----------------------------------------------------------------------------- statistics

Values = Tensor | np.ndarray | Sequence[float]


def _flat(a: Values) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().double().cpu().reshape(-1).numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ConfigError(f"the two importances differ in size ({a.size} vs {b.size} entries)")


def average_ranks(a: Values) -> np.ndarray:
    """Ranks 1..P of the entries of ``a`` (ascending), tied entries sharing their mean rank."""
    return pd.Series(_flat(a)).rank(method="average").to_numpy()


def spearman(a: Values, b: Values) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks of ``a`` and ``b``; NaN when
    either has a single distinct value (no ranking) or fewer than two entries."""
    fa, fb = _flat(a), _flat(b)
    _check_pair(fa, fb)
    if fa.size < 2:
        return math.nan
    ra, rb = average_ranks(fa), average_ranks(fb)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def top_set(a: Values, fraction: float) -> np.ndarray:
    """Indices of the top ``fraction`` of the entries of ``a``: k = max(1, ⌈fraction·P⌉), every
    entry ≥ the k-th largest value (ties included), positive entries only."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--top must lie in (0, 1], got {fraction}")
    fa = _flat(a)
    if fa.size == 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, math.ceil(fraction * fa.size - 1e-9))
    threshold = np.partition(fa, fa.size - k)[fa.size - k]
    return np.flatnonzero((fa >= threshold) & (fa > 0))


def top_overlap(
    fim: Values,
    masq: Values,
    fraction: float = 0.01,
) -> float:
    """|T_F ∩ T_M| / |T_F| for the top-``fraction`` sets (:func:`top_set`) of the FIM and MaSQ;
    NaN when the FIM has no positive entry."""
    ff, fm = _flat(fim), _flat(masq)
    _check_pair(ff, fm)
    tf, tm = top_set(ff, fraction), top_set(fm, fraction)
    if tf.size == 0:
        return math.nan
    return float(np.intersect1d(tf, tm).size) / tf.size


def cancellation_share(
    fim: Values,
    masq_sum: Values,
    fraction: float = 0.01,
    below: float = 0.1,
) -> float:
    """Among the FIM's top-``fraction`` entries, the share with B·M_k < ``below`` · F_k (MaSQ in
    the ``sum`` scale, whose chance level is F_k); NaN when the FIM has no positive entry."""
    if not below > 0:
        raise ConfigError(f"--cancel-below must be > 0, got {below}")
    ff, fm = _flat(fim), _flat(masq_sum)
    _check_pair(ff, fm)
    tf = top_set(ff, fraction)
    if tf.size == 0:
        return math.nan
    return float((fm[tf] < below * ff[tf]).sum()) / tf.size


# ----------------------------------------------------------------------------- importances


def measures(
    model: nn.Module, x: Tensor, y: Tensor, *, masq_batch: int = 1000, seed: int = 0
) -> dict[str, dict[str, Tensor]]:
    """The importances of :data:`MEASURES` at ``model`` over (x, y): FIM with true, sampled
    (labels from the "fisher-labels" stream of run ``seed``, as in a run's importance pass)
    and exact labels, MaSQ ``mean`` and ``sum`` with batches of ``masq_batch``."""
    if masq_batch < 1:
        raise ConfigError(f"--masq-batch must be >= 1, got {masq_batch}")

    def data() -> Any:
        return importance.batches(x, y, masq_batch)

    generator = torch.Generator().manual_seed(stream_seed(seed, labels_stream(0)))
    return {
        "FIM": importance.fisher(model, data()),
        "FIM (sampled)": importance.fisher(model, data(), labels="sampled", generator=generator),
        "FIM (exact)": importance.fisher(model, data(), labels="exact"),
        "MaSQ mean": importance.masq(model, data(), scale="mean"),
        "MaSQ sum": importance.masq(model, data(), scale="sum"),
    }


def compare_rows(
    imps: Mapping[str, Mapping[str, Tensor]],
    *,
    slt: str = "",
    top: float = 0.01,
    cancel_below: float = 0.1,
) -> list[dict[str, Any]]:
    """One row per tensor: ``max_<measure>`` and ``mean_<measure>`` of every measure in
    ``imps`` ({label: importance}, needing "FIM", "MaSQ mean" and "MaSQ sum"), and the
    statistics of the module docstring between "FIM" and MaSQ (the cancelling share on
    "MaSQ sum", the others on "MaSQ mean")."""
    for need in ("FIM", "MaSQ mean", "MaSQ sum"):
        if need not in imps:
            raise ConfigError(f"compare_rows needs the measure {need!r}")
    rows = []
    for name, fim in imps["FIM"].items():
        m = imps["MaSQ mean"][name]
        row: dict[str, Any] = {"slt": slt, "tensor": name, "num_params": fim.numel()}
        for label, imp in imps.items():
            row[f"max_{label}"] = float(imp[name].max())
            row[f"mean_{label}"] = float(imp[name].double().mean())
        mean_m = row["mean_MaSQ mean"]
        row["mean_ratio"] = row["mean_FIM"] / mean_m if mean_m > 0 else math.nan
        row["spearman"] = spearman(fim, m)
        row["top_overlap"] = top_overlap(fim, m, top)
        row["cancel_share"] = cancellation_share(fim, imps["MaSQ sum"][name], top, cancel_below)
        rows.append(row)
    return rows


def compare_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    """The comparison table (every SLT and tensor) as Markdown."""
    return markdown(rows, list(COMPARE_COLUMNS), title)


@dataclass
class StateComparison:
    """The comparison at one task-1 state: its config, one row per tensor, timings."""

    config: RunConfig
    rows: list[dict[str, Any]]
    samples: int
    seconds: dict[str, float]


def compare_state(
    config: RunConfig,
    state: Mapping[str, Tensor],
    tasks: list[Any],
    *,
    top: float = 0.01,
    cancel_below: float = 0.1,
) -> StateComparison:
    """:func:`measures` and :func:`compare_rows` at ``state`` (a network of ``config``'s
    architecture) over task 1's whole training set, batches of ``config.masq_batch``."""
    from masq.protocol import build_model

    model = build_model(config, tasks)
    model.load_state_dict(dict(state))
    x, y = tasks[0].train
    start = time.perf_counter()
    imps = measures(model, x, y, masq_batch=config.masq_batch, seed=config.seed)
    seconds = {"importance": time.perf_counter() - start}
    rows = compare_rows(imps, slt=config.slt, top=top, cancel_below=cancel_below)
    for row in rows:
        row["hidden"] = hidden_text(config.hidden)
        row["init"] = str(config.init)
    return StateComparison(config=config, rows=rows, samples=len(x), seconds=seconds)


# ----------------------------------------------------------------------------- figure

_BARS: tuple[tuple[str, str], ...] = (
    ("FIM", "tab:blue"),
    ("FIM (sampled)", "lightsteelblue"),
    ("FIM (exact)", "slategray"),
    ("MaSQ mean", "tab:red"),
    ("MaSQ sum", "tab:orange"),
)


def maxima_figure(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """The paper's Figs 6-8 in one figure: per SLT a panel of grouped bars, the maximum of
    each measure per tensor, on a log axis."""
    if not rows:
        raise ValueError("maxima_figure: no rows")
    slts = list(dict.fromkeys(str(r["slt"]) for r in rows))
    fig = Figure(figsize=(5.4 * len(slts), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(slts), squeeze=False).ravel()
    bars = [(label, colour) for label, colour in _BARS if f"max_{label}" in rows[0]]
    width = 0.8 / len(bars)
    for ax, slt in zip(axes, slts, strict=True):
        mine = [r for r in rows if str(r["slt"]) == slt]
        xs = np.arange(len(mine))
        for i, (label, colour) in enumerate(bars):
            values = [max(float(r[f"max_{label}"]), 1e-30) for r in mine]
            ax.bar(xs + (i - (len(bars) - 1) / 2) * width, values, width, label=label, color=colour)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(r["tensor"]) for r in mine], rotation=45, ha="right")
        arch = mine[0].get("hidden")
        ax.set_title(f"{slt}" + (f", 784-{arch}-10" if arch else ""))
        ax.set_ylabel("maximum importance")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def write_outputs(
    rows: list[dict[str, Any]], out: str | Path, *, title: str, body: Mapping[str, Any]
) -> tuple[str, list[Path]]:
    """Write ``out``/compare.md, compare.csv, compare_maxima.png and the manifest compare.json
    (``body`` plus the files and provenance); (the Markdown table, the paths written)."""
    out = Path(out)
    md = compare_markdown(rows, title)
    figure = maxima_figure(rows, title="Maximum importance per tensor (log scale)")
    written = [
        save_png(figure, out / "compare_maxima.png"),
        atomic_write(out / "compare.md", md),
        atomic_write(out / "compare.csv", pd.DataFrame(rows).to_csv(index=False)),
    ]
    files = {"markdown": "compare.md", "csv": "compare.csv", "figures": ["compare_maxima.png"]}
    manifest = {**body, "title": title, "provenance": provenance(), "files": files}
    written.append(write_manifest(out, "compare", manifest))
    return md, written
