"""Paired comparisons of Table 1, settled, over the confirmation seeds.

Two configurations run on the same seed start re-training from the same task-1 state (the
seed fixes the SLT's split, the initialisation and task 1's training), so their accuracies on
seeds 1-4 form pairs, and the difference d = a − b per seed removes the task-1 state's share
of the spread. For n pairs, :func:`paired_test` gives the mean of d, its 95 % confidence
interval mean ± t_{0.975, n−1} · s_d / √n and the two-sided p of the paired t-test.

- :func:`paired_tests`: the MaSQ winner against the FIM winner per (selection, SLT,
  criterion, init): are the two importances distinguishable?
- :func:`gain_tests`: each EWC winner against the no-EWC winner (λ = 0, ε2 selected on seed 0
  the same way, importance "none"): what EWC gives over a tuned baseline, not only over the
  λ = 0 run at the EWC winner's own ε2 (the settled tables' last column).

Both take the long frame of :func:`masq.analysis.settle.confirmation_values`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from masq.analysis.common import fmt, markdown, pct, records
from masq.analysis.settle import IMPORTANCE_NAME, KEYS, Campaign
from masq.config import round_sig

GROUP: list[str] = ["select_on", "slt", "criterion", "init"]


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test of ``a`` against ``b`` (pairs: same seed): n, the mean of d = a − b, its
    95 % CI mean ± t_{0.975, n−1} · s_d / √n, t = mean / (s_d / √n) and the two-sided p
    (:func:`scipy.stats.ttest_rel`); NaN where n < 2."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = x - y
    n = len(d)
    out = {"n": float(n), "mean_diff": float(d.mean()) if n else math.nan}
    if n < 2:
        return out | {"ci_low": math.nan, "ci_high": math.nan, "t": math.nan, "p": math.nan}
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
    test = stats.ttest_rel(x, y)
    return out | {
        "ci_low": out["mean_diff"] - half,
        "ci_high": out["mean_diff"] + half,
        "t": float(test.statistic),
        "p": float(test.pvalue),
    }


def _pairs(part: pd.DataFrame, a: str, b: str) -> pd.DataFrame | None:
    """Seeds × {a, b} of ``part``'s values, only seeds where both are stored; None when one
    of the two importances has no winner in ``part``."""
    wide = part.pivot_table(index="seed", columns="importance", values="value")
    if not {a, b} <= set(wide.columns):
        return None
    return wide[[a, b]].dropna()


def paired_tests(values: pd.DataFrame, campaign: Campaign) -> pd.DataFrame:
    """Per (selection, SLT, criterion, init): :func:`paired_test` of the MaSQ winner against
    the FIM winner over the confirmation seeds both have stored."""
    more = values[values["seed"] != campaign.seed]
    rows = []
    for key, part in more.groupby(GROUP, sort=True):
        wide = _pairs(part, "masq", "fisher")
        if wide is None:
            continue
        test = paired_test(list(wide["masq"]), list(wide["fisher"]))
        head = dict(zip(GROUP, key, strict=True))
        rows.append(head | test | {"seeds": ",".join(str(s) for s in wide.index)})
    return pd.DataFrame(rows)


def gain_tests(values: pd.DataFrame, settled: pd.DataFrame, campaign: Campaign) -> pd.DataFrame:
    """Per (selection, SLT, criterion, init) and EWC importance: :func:`paired_test` of the
    EWC winner against the no-EWC winner over the confirmation seeds both have stored, with
    both winners' ε2 and λ and their confirmation means from ``settled``
    (:func:`masq.analysis.settle.settled_table`)."""
    more = values[values["seed"] != campaign.seed]
    cells = {tuple(r[k] for k in KEYS): r for r in settled.to_dict("records")}
    rows = []
    for key, part in more.groupby(GROUP, sort=True):
        head = dict(zip(GROUP, key, strict=True))
        for imp in campaign.importances:
            wide = _pairs(part, imp, "none")
            if wide is None:
                continue
            ewc = cells[tuple((head | {"importance": imp})[k] for k in KEYS)]
            base = cells[tuple((head | {"importance": "none"})[k] for k in KEYS)]
            test = paired_test(list(wide[imp]), list(wide["none"]))
            rows.append(
                head
                | {"importance": imp, "lr2": ewc["lr2"], "lam": ewc["lam"], "mean": ewc["mean"],
                   "none_lr2": base["lr2"], "none_mean": base["mean"], "none_std": base["std"]}
                | test
                | {"seeds": ",".join(str(s) for s in wide.index)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def _rounded(r: dict[str, Any]) -> dict[str, Any]:
    return (
        r
        | {k: pct(r[k]) for k in ("mean_diff", "ci_low", "ci_high")}
        | {
            "t": round(r["t"], 2),
            "p": round_sig(r["p"], 2),
        }
    )


def paired_markdown(paired: pd.DataFrame) -> str:
    """The MaSQ-versus-FIM tests as Markdown (differences in percentage points)."""
    title = (
        "MaSQ versus FIM, paired over the confirmation seeds (same seed = same task-1 state): "
        "mean of d = MaSQ − FIM in points, its 95 % CI and the two-sided p of a paired t-test."
    )
    rows = [_rounded(r) for r in records(paired)]
    cols = [("select_on", "selected on"), ("slt", "SLT"), ("criterion", "criterion"),
            ("init", "init"), ("n", "n"), ("mean_diff", "mean d (points)"),
            ("ci_low", "95 % CI from"), ("ci_high", "to"), ("t", "t"), ("p", "p"),
            ("seeds", "seeds")]  # fmt: skip
    return markdown(rows, cols, title)


def _gain_cells(r: dict[str, Any]) -> dict[str, str]:
    return {
        "importance": IMPORTANCE_NAME[r["importance"]],
        "lr2": fmt(r["lr2"]),
        "lam": fmt(r["lam"]),
        "none_lr2": fmt(r["none_lr2"]),
        "mean": pct(r["mean"]),
        "none_mean": f"{pct(r['none_mean'])} ± {pct(r['none_std'])}",
    }


def gain_markdown(gains: pd.DataFrame) -> str:
    """The EWC-versus-no-EWC tests as Markdown (accuracies in %, differences in points)."""
    title = (
        "EWC versus no EWC with ε2 tuned alike (λ = 0, ε2 selected on seed 0 by the same "
        "criterion and curves), paired over the confirmation seeds: the EWC winner's and the "
        "no-EWC winner's mean over those seeds, and the mean of d = EWC − no EWC in points "
        "with its 95 % CI and the two-sided p of a paired t-test."
    )
    rows = [_rounded(r) | _gain_cells(r) for r in records(gains)]
    cols = [("select_on", "selected on"), ("slt", "SLT"), ("criterion", "criterion"),
            ("init", "init"), ("importance", "EWC"), ("lr2", "ε2"), ("lam", "λ"),
            ("mean", "EWC %"), ("none_lr2", "no EWC: ε2"), ("none_mean", "no EWC %"),
            ("n", "n"), ("mean_diff", "gain d (points)"), ("ci_low", "95 % CI from"),
            ("ci_high", "to"), ("p", "p")]  # fmt: skip
    return markdown(rows, cols, title)
