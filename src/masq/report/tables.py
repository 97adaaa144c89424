"""The paper's Table 1 from stored results (§5), for runs of any T.

Reads a results directory through :mod:`masq.store` (JSON only; no torch). Table 1 of the
paper, per SLT (accuracy on the union of all tasks during the final phase):

- "best" criterion: the configuration with the highest D1∪D2 accuracy reached during
  re-training on D2, and that accuracy;
- "last" criterion: the configuration with the highest D1∪D2 accuracy at the end of
  re-training, that accuracy, and the final accuracy of the same configuration with λ = 0.

With several seeds a configuration's score is the mean over its seeds (shown as
mean ± sample std) and the winner is selected by the mean. Ties are broken by, in order:
the lower std, the smaller λ, the fewer parameters, then the configuration's canonical text,
so the table never depends on the order of files. ``select_on="test"`` selects on the test
curves (what the paper did); ``select_on="val"`` selects on the validation curves (runs need
``eval_val``) and reports test accuracy at the selected point. ``group_by`` gives one winner
per value of some fields (e.g. importance, scale, init) so one table compares conventions;
λ = 0 runs (importance "none") take part in every importance group.
For runs of more than two tasks the table adds, for the winner, the average accuracy, the
backward transfer and the forgetting at the end of the run (:mod:`masq.protocol.result`).

IMM runs (consolidation mean-imm / mode-imm, :mod:`masq.protocol.imm`) compete among
themselves under one criterion, "merged": the merged net's accuracy at the weight α_T of the
last task chosen on the validation sets ("val-selected", ``select_on="val"``) or best on the
test sets ("test-best", ``select_on="test"``); the table shows that α_T (mean over seeds)
where EWC rows show the iteration.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd

from masq.config import (
    ID_FIELDS,
    IMPORTANCE_FIELDS,
    Criterion,
    SelectOn,
    choice,
    n_params,
)
from masq.errors import ConfigError
from masq.fileio import atomic_write
from masq.store import load

# Fields that define a configuration (all but the seed and the RUN fields).
CONFIG_FIELDS: tuple[str, ...] = tuple(f for f in ID_FIELDS if f != "seed")
# Fields a λ = 0 run does not depend on (stored once, with their defaults).
LAM0_FREE_FIELDS: tuple[str, ...] = (*IMPORTANCE_FIELDS, "consolidation", "gamma")
# One winner per value of these (``--group-by``): every field but those selected over.
GROUPABLE: tuple[str, ...] = tuple(
    f for f in CONFIG_FIELDS if f not in ("slt", "hidden", "lr2", "lam")
)
CRITERIA: tuple[str, ...] = Criterion.values()
MERGED = "merged"  # the criterion of IMM runs: the merged net at the selected α
SELECT_ON: tuple[str, ...] = SelectOn.values()
TRANSFER: tuple[str, ...] = ("average_accuracy", "bwt", "forgetting")


def _columns(select_on: str, criterion: str) -> tuple[str, str]:
    """(column selected on, column prefix reported) for a criterion."""
    if select_on == SelectOn.TEST:
        return f"{criterion}.union", criterion
    return f"{criterion}_val.val_union", f"{criterion}_val"


def check_select_on(df: pd.DataFrame, select_on: str) -> None:
    """ConfigError unless ``df`` can be selected on ``select_on``."""
    select_on = choice(SelectOn, select_on, "--select-on")
    ewc = df[~is_imm(df)]  # IMM runs always select α on validation too
    if select_on == SelectOn.VAL and not ewc.empty:
        col = "best_val.val_union"
        if col not in ewc.columns or ewc[col].isna().any():
            raise ConfigError(
                "--select-on val: some runs have no validation curves; re-run the grid with "
                "--eval-val (into a new --results directory) or use --select-on test"
            )


def is_imm(df: pd.DataFrame) -> pd.Series:
    """Which rows of ``df`` are IMM runs."""
    if "consolidation" not in df.columns:
        return pd.Series(False, index=df.index)
    from masq.consolidation import METHODS  # the registry loads torch: only when asked

    merged = [name for name, m in METHODS.items() if m.record_key == "imm"]
    return df["consolidation"].isin(merged)


def _criteria(candidates: pd.DataFrame) -> list[tuple[pd.DataFrame, str]]:
    """(runs, criterion) pairs of a group: EWC runs under "best" and "last", IMM runs under
    "merged"."""
    imm = is_imm(candidates)
    out = [(candidates[~imm], c) for c in CRITERIA] if (~imm).any() else []
    return out + ([(candidates[imm], MERGED)] if imm.any() else [])


def with_wildcards(df: pd.DataFrame, group_by: Sequence[str]) -> pd.DataFrame:
    """``df`` with every λ = 0 run repeated in each importance group of ``group_by``.

    λ = 0 runs do not depend on the importance settings (they are stored once, with
    importance "none"), so when grouping by importance fields they compete in every group
    (of EWC runs: IMM runs do not use λ and keep to themselves).
    """
    keys = [k for k in group_by if k in LAM0_FREE_FIELDS]
    if not keys or df.empty:
        return df
    imm = is_imm(df)
    ewc, zero = df[(df["lam"] > 0) & ~imm], df[(df["lam"] == 0) & ~imm]
    combos = cast(list[dict[str, Any]], ewc[keys].drop_duplicates().to_dict("records"))
    if not combos or zero.empty:
        return df
    parts = [df[imm], ewc] + [zero.assign(**combo) for combo in combos]
    return pd.concat(parts, ignore_index=True)


def spoiled(df: pd.DataFrame) -> pd.Series:
    """Which runs of ``df`` have no accuracy to average: diverged (``meta.diverged``: the
    weights stopped being finite, so the accuracies are those of a broken net) or with a NaN
    accuracy on the union of all tasks (a record whose numbers were not finite)."""
    flag = pd.Series(False, index=df.index)
    if "diverged" in df.columns:
        flag |= df["diverged"].fillna("").astype(str) != ""
    for column in ("best.union", "last.union"):
        if column in df.columns:
            flag |= pd.to_numeric(df[column], errors="coerce").isna()
    return flag


def aggregate(df: pd.DataFrame, select_on: str = "test") -> pd.DataFrame:
    """One row per configuration (seeds pooled): mean, std and count of the selection
    columns and the reported accuracies of both criteria, the number of tasks T, plus the
    run ids. Diverged runs and runs with NaN accuracies (:func:`spoiled`) are never averaged
    in: ``seeds`` counts every run, ``diverged`` those left out (all of them: the means are
    NaN, shown as "diverged")."""
    fields = [f for f in CONFIG_FIELDS if f in df.columns]
    metrics: list[str] = []
    for criterion in (*CRITERIA, MERGED):
        select, prefix = _columns(select_on, criterion)
        metrics += [
            select,
            f"{prefix}.union",
            f"{prefix}.D1",
            f"{prefix}.D2",
            f"{prefix}.iteration",
            f"{prefix}.alpha",
        ]
    metrics += list(TRANSFER)
    metrics = list(dict.fromkeys(m for m in metrics if m in df.columns))
    bad = spoiled(df)
    df = df.assign(_spoiled=bad.astype(int))
    df.loc[bad, metrics] = math.nan  # never averaged in
    grouped = df.groupby(fields, dropna=False, sort=True)
    out = grouped[metrics].mean()
    std = grouped[metrics].std(ddof=1)
    out = out.join(std.add_suffix(":std"))
    out["seeds"] = grouped.size()
    out["diverged"] = grouped["_spoiled"].sum().astype(int)
    out["tasks"] = grouped["tasks"].max()  # T, fixed by the SLT
    out["run_ids"] = grouped["run_id"].agg(lambda s: ",".join(sorted(s)))
    out["seed_list"] = grouped["seed"].agg(lambda s: ",".join(str(v) for v in sorted(s)))
    out = out.reset_index()
    out["params"] = out["hidden"].map(n_params)
    out["config_text"] = out[fields].astype(str).agg("|".join, axis=1)
    return out


def select(candidates: pd.DataFrame, column: str) -> pd.Series:
    """The winning row of ``candidates`` by the mean of ``column`` (ties: module docstring)."""
    ranked = candidates.assign(
        _score=candidates[column].fillna(-math.inf),
        _std=candidates[f"{column}:std"].fillna(0.0),
    ).sort_values(
        ["_score", "_std", "lam", "params", "config_text"],
        ascending=[False, True, True, True, True],
        kind="mergesort",
    )
    return ranked.iloc[0]


def _same_except_lam(candidates: pd.DataFrame, winner: pd.Series) -> pd.DataFrame:
    keep = [
        f
        for f in CONFIG_FIELDS
        if f in candidates.columns and f != "lam" and f not in LAM0_FREE_FIELDS
    ]
    mask = candidates["lam"] == 0
    for f in keep:
        mask &= candidates[f] == winner[f]
    return candidates[mask]


def label(values: Any) -> str:
    """The detailed method label of a run (:func:`masq.consolidation.method_label`, which
    asks the method and measure registries; imported here so that importing the report
    stays free of torch)."""
    from masq.consolidation import method_label

    return method_label(values, detailed=True)


def table1(
    df: pd.DataFrame, *, select_on: str = "test", group_by: Sequence[str] = ()
) -> pd.DataFrame:
    """The paper's Table 1 (module docstring) as a DataFrame: per SLT (and ``group_by``
    values) one row per criterion with the winner's configuration, its accuracy (mean, std
    over seeds) on D1∪D2, D1 and D2 and, for "last", the same configuration with λ = 0."""
    if df.empty:
        raise ConfigError("no stored runs to tabulate; run `masq grid --results DIR` first")
    check_select_on(df, select_on)
    unknown = [g for g in group_by if g not in GROUPABLE]
    if unknown:
        raise ConfigError(f"--group-by: cannot group by {unknown}; use some of {list(GROUPABLE)}")
    data = with_wildcards(df, group_by)
    agg = aggregate(data, select_on)
    rows: list[dict[str, Any]] = []
    keys = ["slt", *group_by]
    for values, candidates in agg.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        for members, criterion in _criteria(candidates):
            column, prefix = _columns(select_on, criterion)
            win = select(members, column)
            merged = criterion == MERGED
            row: dict[str, Any] = dict(zip(keys, values, strict=True))
            row.update(
                criterion=criterion,
                selected_on=select_on,
                hidden=win["hidden"],
                lr2=win["lr2"],
                lam=math.nan if merged else win["lam"],
                alpha=win.get(f"{prefix}.alpha", math.nan),
                method=label(win) + diverged_note(win),
                tasks=int(win["tasks"]),
                seed_list=win["seed_list"],
                acc_mean=win[f"{prefix}.union"],
                acc_std=win[f"{prefix}.union:std"],
                d1_mean=win.get(f"{prefix}.D1", math.nan),
                d2_mean=win.get(f"{prefix}.D2", math.nan),
                iteration=win.get(f"{prefix}.iteration", math.nan),
                seeds=int(win["seeds"]),
                run_ids=win["run_ids"],
                diverged=int(win.get("diverged", 0) or 0),
                lam0_mean=math.nan,
                lam0_std=math.nan,
                lam0_diverged=0,
                **{name: math.nan if merged else win.get(name, math.nan) for name in TRANSFER},
            )
            for name in ("init", "dataset", "iters1", "iters2", "eval_every"):
                row.setdefault(name, win[name])
            if select_on == "val":
                row["selection_mean"] = win[column]
            if criterion == "last":
                zero = _same_except_lam(members, win)
                if not zero.empty:
                    z = zero.iloc[0]
                    row["lam0_mean"] = z[f"{prefix}.union"]
                    row["lam0_std"] = z[f"{prefix}.union:std"]
                    row["lam0_diverged"] = int(z.get("diverged", 0) or 0)
            rows.append(row)
    return pd.DataFrame(rows)


def diverged_note(win: Any) -> str:
    """ " [diverged in k of n]" when k of the winner's n seeds diverged, else ""."""
    k = int(win.get("diverged", 0) or 0)
    return f" [diverged in {k} of {int(win['seeds'])}]" if k else ""


def _pct(mean: float, std: float, diverged: Any = 0) -> str:
    """An accuracy cell in %: "mean ± std"; with no mean, "diverged" where runs were left out
    of it as diverged (:func:`spoiled`), else "—"."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "diverged" if _count(diverged) else "—"
    text = f"{100 * mean:.2f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {100 * std:.2f}"
    return text


def _count(x: Any) -> int:
    """A count from a table cell (NaN or missing: 0)."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return 0
    return 0 if math.isnan(value) else int(value)


def group_cell(row: Any, name: str) -> str:
    """A ``--group-by`` value of a table row, or "—" where the row's measure does not read
    that field (the FIM has no MaSQ scale: "fisher | — | no EWC", not "fisher | mean"); asked
    of the measure registry (:attr:`masq.importance.Measure.uses`)."""
    if name in IMPORTANCE_FIELDS and name != "importance" and "importance" in row:
        from masq.importance import get_measure

        if name not in get_measure(row["importance"]).uses:
            return "—"
    return _num(row[name])


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) else str(x)


def _alpha_or_iteration(r: pd.Series) -> str:
    """The iteration of an EWC winner, α_T of an IMM one ("—" where no run gave one)."""
    value = r["alpha"] if r["criterion"] == MERGED else r["iteration"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"α_T {value:.2f}" if r["criterion"] == MERGED else _num(value)


def _criterion_cell(r: pd.Series) -> str:
    if r["criterion"] != MERGED:
        return str(r["criterion"])
    return "merged (val-selected α)" if r["selected_on"] == "val" else "merged (test-best α)"


def to_markdown(table: pd.DataFrame, group_by: Sequence[str] = ()) -> str:
    """Table 1 as Markdown, with a line naming the selection data."""
    if table.empty:
        return "(no runs)\n"
    select_on = table["selected_on"].iloc[0]
    label = (
        "selected on the TEST curves (as the paper did)"
        if select_on == "test"
        else "selected on the VALIDATION curves; test accuracy reported"
    )
    many = bool((table["tasks"] > 2).any()) if "tasks" in table else False
    imm_rows = bool((table["criterion"] == MERGED).any())
    union = "all tasks" if many else "D1∪D2"
    header = [
        "SLT",
        *group_by,
        "criterion",
        "architecture",
        *(["init"] if "init" not in group_by else []),
        "ε2",
        "λ",
        "method",
        f"{union} %",
        "D1 %",
        "D2 %",
        "iteration",
        f"{union} % with λ = 0",
        *(["ACC %", "BWT %", "forgetting %"] if many else []),
        "seeds",
    ]
    lines = [
        f"Table 1: best configuration per SLT, {label}; accuracy in % (mean ± std over seeds)"
        + (
            "; ACC, BWT, forgetting at the end of the winner's runs (mean over seeds)."
            if many
            else "."
        )
        + (
            " IMM rows (criterion merged): the merged net at the last task's weight α_T "
            + (
                "best on the TEST sets (test-best α)"
                if select_on == "test"
                else "chosen on the VALIDATION sets (val-selected α)"
            )
            + ", shown in the iteration column; λ is EWC's."
            if imm_rows
            else ""
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, r in table.iterrows():
        cells = [
            str(r["slt"]),
            *(group_cell(r, g) for g in group_by),
            _criterion_cell(r),
            f"784-{r['hidden']}-10",
            *([str(r["init"])] if "init" not in group_by else []),
            _num(r["lr2"]),
            "—" if r["criterion"] == MERGED else _num(r["lam"]),
            r["method"],
            _pct(r["acc_mean"], r["acc_std"], r.get("diverged")),
            _pct(r["d1_mean"], math.nan, r.get("diverged")),
            _pct(r["d2_mean"], math.nan, r.get("diverged")),
            _alpha_or_iteration(r),
            _pct(r["lam0_mean"], r["lam0_std"], r.get("lam0_diverged"))
            if r["criterion"] == "last"
            else "",
            *([_pct(r[name], math.nan, r.get("diverged")) for name in TRANSFER] if many else []),
            str(r["seeds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    table: pd.DataFrame, out: str | os.PathLike[str], group_by: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write Table 1 as ``table1_<selected_on>.md`` and ``.csv`` into ``out`` (atomically)."""
    out_dir = Path(out)
    select_on = table["selected_on"].iloc[0] if not table.empty else "test"
    suffix = f"{select_on}" + (f"_by_{'_'.join(group_by)}" if group_by else "")
    md = atomic_write(out_dir / f"table1_{suffix}.md", to_markdown(table, group_by))
    csv = atomic_write(out_dir / f"table1_{suffix}.csv", table.to_csv(index=False))
    return md, csv


def load_table(
    root: str | os.PathLike[str], *, select_on: str = "test", group_by: Sequence[str] = ()
) -> pd.DataFrame:
    """Table 1 of the results dir ``root``."""
    return table1(load(root), select_on=select_on, group_by=group_by)
