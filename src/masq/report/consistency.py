"""The consistency check (the paper's §5.2): each SLT's winner re-run with the FIM at
λ = 1/ε2 and without EWC, drawn over every phase."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from masq.config import Criterion, choice, lam_per_lr2
from masq.curves import union_name
from masq.fileio import save_png
from masq.report.tables import CONFIG_FIELDS, table1
from masq.store import load_record, load_result


def consistency_plan(
    df: pd.DataFrame, *, select_on: str = "test", criterion: str = "best"
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per SLT, the configurations of the consistency check (the paper's §5.2), as
    config dicts (seed: the lowest seed of the winner):

    - "EWC+MaSQ": the SLT's best MaSQ configuration with λ > 0 by ``criterion`` (as stored;
      when there is none, the best with λ > 0, else the best of all);
    - "EWC+FIM": the same with importance "fisher" (true labels) and λ = 1/ε2;
    - "no EWC": the same with λ = 0 (importance "none").

    The caller canonicalizes them (``masq.grid.canonical``) and runs the missing ones.
    """
    criterion = choice(Criterion, criterion, "--criterion")
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
            "fisher_labels": "empirical",
            "lam": lam_per_lr2(1.0, lr2),
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
    """One figure per SLT (every task and the union of all over the phases) of the runs
    ``{slt: {label: run id}}``, drawn with :mod:`masq.report.figures`; PNG paths written."""
    from masq.report import figures  # the curve style of `masq compare`

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
        paths.append(save_png(fig, Path(out) / name, dpi=figures.FIGURE_DPI))
    return paths


def consistency_summary(root: str | os.PathLike[str], runs: Mapping[str, Mapping[str, str]]) -> str:
    """A Markdown table of the consistency runs: best and last accuracy on the union of all
    tasks per method."""
    lines = [
        "| SLT | method | λ | best (all tasks) % | last (all tasks) % | run id |",
        "|---|---|---|---|---|---|",
    ]
    for slt, labelled in runs.items():
        for label, rid in labelled.items():
            result = load_record(root, rid)["result"]
            lam = result["config"]["lam"]
            union = union_name(len(result["curves"]))
            lines.append(
                f"| {slt} | {label} | {lam:g} | {100 * result['best'][union]:.2f} | "
                f"{100 * result['last'][union]:.2f} | {rid} |"
            )
    return "\n".join(lines) + "\n"
