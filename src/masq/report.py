"""The paper's tables and figures from stored results (PAPER.md section 5).

Reads a results directory through :mod:`masq.results` (JSON only; this module never imports
:mod:`masq.train`). Table 1 of the paper, per SLT:

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
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from masq.errors import ConfigError
from masq.fileio import atomic_write
from masq.results import UNION, VAL_UNION, load, load_record

# Fields that define a configuration (all but the seed and the device).
CONFIG_FIELDS: tuple[str, ...] = (
    "slt",
    "dataset",
    "hidden",
    "init",
    "lr1",
    "lr2",
    "lam",
    "importance",
    "masq_batch",
    "scale",
    "fisher_labels",
    "iters1",
    "iters2",
    "batch_size",
    "eval_every",
    "eval_val",
)
IMPORTANCE_GROUP_FIELDS: tuple[str, ...] = ("importance", "masq_batch", "scale", "fisher_labels")
GROUPABLE: tuple[str, ...] = (
    "importance",
    "masq_batch",
    "scale",
    "fisher_labels",
    "init",
    "dataset",
    "lr1",
    "iters1",
    "iters2",
    "eval_every",
)
CRITERIA: tuple[str, ...] = ("best", "last")
SELECT_ON: tuple[str, ...] = ("test", "val")


def _n_params(hidden: str) -> int:
    widths = [784, *(int(h) for h in hidden.split("-") if h), 10]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def _columns(select_on: str, criterion: str) -> tuple[str, str]:
    """(column selected on, column prefix reported) for a criterion."""
    if select_on == "test":
        return f"{criterion}.{UNION}", criterion
    return f"{criterion}_val.{VAL_UNION}", f"{criterion}_val"


def check_select_on(df: pd.DataFrame, select_on: str) -> None:
    """ConfigError unless ``df`` can be selected on ``select_on``."""
    if select_on not in SELECT_ON:
        raise ConfigError(f"--select-on: unknown value {select_on!r}; use 'test' or 'val'")
    if select_on == "val":
        col = f"best_val.{VAL_UNION}"
        if col not in df.columns or df[col].isna().any():
            raise ConfigError(
                "--select-on val: some runs have no validation curves; re-run the grid with "
                "--eval-val (into a new --results directory) or use --select-on test"
            )


def with_wildcards(df: pd.DataFrame, group_by: Sequence[str]) -> pd.DataFrame:
    """``df`` with every λ = 0 run repeated in each importance group of ``group_by``.

    λ = 0 runs do not depend on the importance settings (they are stored once, with
    importance "none"), so when grouping by importance fields they compete in every group.
    """
    keys = [k for k in group_by if k in IMPORTANCE_GROUP_FIELDS]
    if not keys or df.empty:
        return df
    ewc, zero = df[df["lam"] > 0], df[df["lam"] == 0]
    combos = ewc[keys].drop_duplicates().to_dict("records")
    if not combos or zero.empty:
        return df
    parts = [ewc] + [zero.assign(**combo) for combo in combos]
    return pd.concat(parts, ignore_index=True)


def aggregate(df: pd.DataFrame, select_on: str = "test") -> pd.DataFrame:
    """One row per configuration (seeds pooled): mean, std and count of the selection
    columns and the reported accuracies of both criteria, plus the run ids."""
    fields = [f for f in CONFIG_FIELDS if f in df.columns]
    metrics: list[str] = []
    for criterion in CRITERIA:
        select, prefix = _columns(select_on, criterion)
        metrics += [
            select,
            f"{prefix}.{UNION}",
            f"{prefix}.D1",
            f"{prefix}.D2",
            f"{prefix}.iteration",
        ]
    metrics = list(dict.fromkeys(m for m in metrics if m in df.columns))
    grouped = df.groupby(fields, dropna=False, sort=True)
    out = grouped[metrics].mean()
    std = grouped[metrics].std(ddof=1)
    out = out.join(std.add_suffix(":std"))
    out["seeds"] = grouped.size()
    out["run_ids"] = grouped["run_id"].agg(lambda s: ",".join(sorted(s)))
    out["seed_list"] = grouped["seed"].agg(lambda s: ",".join(str(v) for v in sorted(s)))
    out = out.reset_index()
    out["params"] = out["hidden"].map(_n_params)
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
        if f in candidates.columns and f != "lam" and f not in IMPORTANCE_GROUP_FIELDS
    ]
    mask = candidates["lam"] == 0
    for f in keep:
        mask &= candidates[f] == winner[f]
    return candidates[mask]


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
        for criterion in CRITERIA:
            column, prefix = _columns(select_on, criterion)
            win = select(candidates, column)
            row: dict[str, Any] = dict(zip(keys, values, strict=True))
            row.update(
                criterion=criterion,
                selected_on=select_on,
                hidden=win["hidden"],
                lr2=win["lr2"],
                lam=win["lam"],
                method=method(win),
                seed_list=win["seed_list"],
                acc_mean=win[f"{prefix}.{UNION}"],
                acc_std=win[f"{prefix}.{UNION}:std"],
                d1_mean=win.get(f"{prefix}.D1", math.nan),
                d2_mean=win.get(f"{prefix}.D2", math.nan),
                iteration=win.get(f"{prefix}.iteration", math.nan),
                seeds=int(win["seeds"]),
                run_ids=win["run_ids"],
                lam0_mean=math.nan,
                lam0_std=math.nan,
            )
            for name in ("init", "dataset", "iters1", "iters2", "eval_every"):
                row.setdefault(name, win[name])
            if select_on == "val":
                row["selection_mean"] = win[column]
            if criterion == "last":
                zero = _same_except_lam(candidates, win)
                if not zero.empty:
                    z = zero.iloc[0]
                    row["lam0_mean"] = z[f"{prefix}.{UNION}"]
                    row["lam0_std"] = z[f"{prefix}.{UNION}:std"]
            rows.append(row)
    return pd.DataFrame(rows)


def method(row: Mapping[str, Any]) -> str:
    """The consolidation of a run: "none" (λ = 0), "masq (mean, B=1000)", "fisher (true)"."""
    if row["lam"] == 0 or row["importance"] == "none":
        return "none"
    if row["importance"] == "masq":
        return f"masq ({row['scale']}, B={int(row['masq_batch'])})"
    return f"fisher ({row['fisher_labels']})"


def _pct(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = f"{100 * mean:.2f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {100 * std:.2f}"
    return text


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) else str(x)


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
    header = [
        "SLT",
        *group_by,
        "criterion",
        "architecture",
        *(["init"] if "init" not in group_by else []),
        "ε2",
        "λ",
        "method",
        "D1∪D2 %",
        "D1 %",
        "D2 %",
        "iteration",
        "D1∪D2 % with λ = 0",
        "seeds",
    ]
    lines = [
        f"Table 1: best configuration per SLT, {label}; accuracy in % (mean ± std over seeds).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, r in table.iterrows():
        cells = [
            str(r["slt"]),
            *(_num(r[g]) for g in group_by),
            r["criterion"],
            f"784-{r['hidden']}-10",
            *([str(r["init"])] if "init" not in group_by else []),
            _num(r["lr2"]),
            _num(r["lam"]),
            r["method"],
            _pct(r["acc_mean"], r["acc_std"]),
            _pct(r["d1_mean"], math.nan),
            _pct(r["d2_mean"], math.nan),
            _num(r["iteration"]),
            _pct(r["lam0_mean"], r["lam0_std"]) if r["criterion"] == "last" else "",
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


# ----------------------------------------------------------------------------- consistency


def consistency_plan(
    df: pd.DataFrame, *, select_on: str = "test", criterion: str = "best"
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per SLT, the configurations of the consistency check (PAPER.md section 5.2), as
    config dicts (seed: the lowest seed of the winner):

    - "EWC+MaSQ": the SLT's best MaSQ configuration with λ > 0 by ``criterion`` (as stored;
      when there is none, the best with λ > 0, else the best of all);
    - "EWC+FIM": the same with importance "fisher" (true labels) and λ = 1/ε2;
    - "no EWC": the same with λ = 0 (importance "none").

    The caller canonicalizes them (``masq.search.canonical``) and runs the missing ones.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"--criterion: unknown value {criterion!r}; use 'best' or 'last'")
    pools = (df[(df["lam"] > 0) & (df["importance"] == "masq")], df[df["lam"] > 0], df)
    pool = next(p for p in pools if not p.empty)
    table = table1(pool, select_on=select_on)
    plan: dict[str, dict[str, dict[str, Any]]] = {}
    for _, row in table[table["criterion"] == criterion].iterrows():
        ids = row["run_ids"].split(",")
        rid = df[df["run_id"].isin(ids)].sort_values(["seed", "run_id"])["run_id"].iloc[0]
        base = _config_of(df, rid)
        lr2 = float(base["lr2"])
        fim = {
            **base,
            "importance": "fisher",
            "fisher_labels": "true",
            "lam": float(f"{1 / lr2:.12g}"),
        }
        none = {**base, "importance": "none", "lam": 0.0}
        plan[str(row["slt"])] = {"EWC+MaSQ": base, "EWC+FIM": fim, "no EWC": none}
    return plan


def _config_of(df: pd.DataFrame, rid: str) -> dict[str, Any]:
    row = df[df["run_id"] == rid].iloc[0]
    config = {f: row[f] for f in (*CONFIG_FIELDS, "seed", "device") if f in row.index}
    config["hidden"] = [int(h) for h in str(config["hidden"]).split("-") if h]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}


def consistency_figures(
    root: str | os.PathLike[str],
    runs: Mapping[str, Mapping[str, str]],
    out: str | os.PathLike[str],
) -> list[Path]:
    """One three-panel figure per SLT (D1, D2, D1∪D2 over training and re-training) of the
    runs ``{slt: {label: run id}}``, drawn with :mod:`masq.figures`; PNG paths written."""
    from masq import figures  # the curve style of `masq compare`
    from masq.results import load_result

    paths = []
    for slt, labelled in runs.items():
        results = {label: load_result(root, rid) for label, rid in labelled.items()}
        first = next(iter(results.values())).config
        title = (
            f"{slt}: consistency check, 784-{'-'.join(map(str, first.hidden))}-10, "
            f"ε2 = {first.lr2:g} (MaSQ λ = {first.lam:g}, FIM λ = 1/ε2)"
        )
        fig = figures.curves_figure(results, title=title)
        name = f"consistency_{slt.replace('/', '_')}.png"
        paths.append(figures.save_figure(fig, Path(out) / name))
    return paths


def consistency_summary(root: str | os.PathLike[str], runs: Mapping[str, Mapping[str, str]]) -> str:
    """A Markdown table of the consistency runs: best and last D1∪D2 accuracy per method."""
    lines = [
        "| SLT | method | λ | best D1∪D2 % | last D1∪D2 % | run id |",
        "|---|---|---|---|---|---|",
    ]
    for slt, labelled in runs.items():
        for label, rid in labelled.items():
            result = load_record(root, rid)["result"]
            lam = result["config"]["lam"]
            lines.append(
                f"| {slt} | {label} | {lam:g} | {100 * result['best'][UNION]:.2f} | "
                f"{100 * result['last'][UNION]:.2f} | {rid} |"
            )
    return "\n".join(lines) + "\n"


def load_table(
    root: str | os.PathLike[str], *, select_on: str = "test", group_by: Sequence[str] = ()
) -> pd.DataFrame:
    """Table 1 of the results dir ``root``."""
    return table1(load(root), select_on=select_on, group_by=group_by)
