"""Table 1, settled, from a results directory: selection, tables, tests and figures.

The campaign and the numbers are :mod:`masq.analysis.settle`'s; this module selects the
winners with :func:`masq.report.tables.table1` (on the seed-0 runs only, one winner per
(SLT, importance, init, criterion) over ε2 and λ, and a no-EWC winner per (SLT, init,
criterion) over ε2 at λ = 0) and writes, into one directory:

- ``table1_settled_test.md/.csv`` and ``table1_settled_val.md/.csv``: the settled tables;
- ``paired.md/.csv``: MaSQ versus FIM, paired t-tests over the confirmation seeds;
- ``gain.md/.csv``: each EWC winner against the no-EWC winner (ε2 tuned alike), paired;
- ``inflation.md/.csv``: seed-0 value − mean over the confirmation seeds, per cell;
- ``plane_<SLT>.png``: "best" and "last" (seed 0) against λ, one line per ε2, one column per
  (importance, init), λ = 0 at the left edge;
- ``winners_<SLT>_<criterion>_<init>.png``: the curves (seed 0) of the test-selected FIM,
  MaSQ and no-EWC winners and of λ = 0 at the MaSQ winner's ε2, drawn by
  :mod:`masq.report.figures`
  (the consistency check's figure, the paper's §5.2, of the settled winners).

What is not stored yet is named, with the ``masq table1`` stage that produces it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masq.analysis import settle
from masq.analysis.common import fmt, markdown, pct, records
from masq.analysis.paired import gain_markdown, gain_tests, paired_markdown, paired_tests
from masq.consolidation import method_label
from masq.fileio import atomic_write, save_png
from masq.report.tables import table1
from masq.runid import run_id
from masq.store import load_result

COLOURS: tuple[str, ...] = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


# ----------------------------------------------------------------------------- markdown


def cell(seed0: float, mean: float, std: float, n: int) -> str:
    """ "seed-0 value (mean ± std over the confirmation seeds)" in %, "(not run)" without
    confirmations."""
    if not n:
        return f"{pct(seed0)} (not run)"
    spread = f" ± {pct(std)}" if n > 1 else ""
    return f"{pct(seed0)} ({pct(mean)}{spread}, n = {n})"


def settled_markdown(settled: pd.DataFrame, select_on: str, seeds: Sequence[int]) -> str:
    """A settled table in the paper's shape, one block per (importance, init)."""
    label = (
        "selected on the TEST curves of seed 0 (as the paper did)"
        if select_on == "test"
        else "selected on the VALIDATION curves of seed 0; test accuracy at the selected point"
    )
    span = f"{min(seeds)}-{max(seeds)}" if seeds else "—"
    lines = [
        f"Table 1, settled: {label}. Accuracy on D1∪D2 in %: seed-0 value (mean ± sample std "
        f"over seeds {span}). λ as run (MaSQ `mean` convention) and in MaSQ's `sum` "
        "convention (λ_sum = λ_mean / B_MaSQ; FIM: —).",
        "",
    ]
    head = ["SLT", "criterion", "architecture", "ε2", "λ", "λ (sum)", "method",
            "D1∪D2 %", "D1∪D2 % with λ = 0"]  # fmt: skip
    part_all = settled[settled["select_on"] == select_on] if not settled.empty else settled
    for imp, init in settle.TABLE_BLOCKS:
        part = part_all[(part_all["importance"] == imp) & (part_all["init"] == init)]
        if part.empty:
            continue
        lines += [f"**{settle.IMPORTANCE_NAME[imp]}, init {init}**", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in records(part):
            last = settle.has_counterpart(r)
            cells = [r["slt"], r["criterion"], f"784-{r['hidden']}-10", fmt(r["lr2"]),
                     fmt(r["lam"]), fmt(r["lam_sum"]), r["method"],
                     cell(r["seed0"], r["mean"], r["std"], r["n"]),
                     cell(r["lam0_seed0"], r["lam0_mean"], r["lam0_std"], r["lam0_n"])
                     if last else ""]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def inflation_markdown(infl: pd.DataFrame) -> str:
    """The inflation of each cell as Markdown (in percentage points)."""
    title = (
        "Inflation of each settled cell: seed-0 value (which selected the configuration) − "
        'mean over the confirmation seeds, in points; for "last" the same of the λ = 0 '
        "counterpart (seed 0's luck, no λ chosen) and the difference of the two (net)."
    )
    points = ("seed0", "mean", "inflation", "lam0_inflation", "net")
    rows = [r | {k: pct(r[k]) for k in points} for r in records(infl)]
    cols = [("select_on", "selected on"), ("importance", "importance"), ("init", "init"),
            ("slt", "SLT"), ("criterion", "criterion"), ("lam", "λ"), ("seed0", "seed 0 %"),
            ("mean", "mean %"), ("n", "n"), ("inflation", "inflation (points)"),
            ("lam0_inflation", "λ = 0: inflation"), ("net", "net")]  # fmt: skip
    return markdown(rows, cols, title)


def select_winners(df: pd.DataFrame, campaign: settle.Campaign, select_on: str) -> pd.DataFrame:
    """Table 1 of the campaign's seed-0 runs of ``df`` (other seeds never take part), one
    winner per (SLT, importance, init, criterion) selected on ``select_on``, and the same of
    the λ = 0 runs alone (importance "none": no EWC, ε2 tuned alike); empty when no seed-0
    run is stored."""
    rows = settle.campaign_rows(df, campaign)
    if rows.empty:
        return pd.DataFrame()
    seed0 = rows[rows["seed"] == campaign.seed]
    if seed0.empty:
        return pd.DataFrame()
    ewc = table1(seed0, select_on=select_on, group_by=["importance", "init"])
    ewc = ewc[ewc["importance"] != "none"]  # only λ = 0 runs stored in a group: not EWC
    zero = seed0[seed0["lam"] == 0]
    if zero.empty:
        return ewc.reset_index(drop=True)
    none = table1(zero, select_on=select_on, group_by=["init"]).assign(importance="none")
    return pd.concat([ewc, none], ignore_index=True)


def lam_tick(lam: float) -> str:
    """A compact λ tick label: ``1e9`` for λ ≥ 1000 (``1e+09`` does not fit beside its
    neighbours), else ``%g`` (``0.1``, ``10``)."""
    if lam >= 1000:
        exponent = math.log10(lam)
        if math.isclose(exponent, round(exponent)):
            return f"1e{round(exponent)}"
    return f"{lam:g}"


def plane_figure(df: pd.DataFrame, campaign: settle.Campaign, slt: str) -> Figure:
    """The seed-0 plane of ``slt``: "best" (top) and "last" (bottom) test accuracy on D1∪D2
    against λ (log axis), one line per ε2, one column per (importance, init); the λ = 0 run
    of each ε2 is drawn at the left edge (a square marker, x tick "0")."""
    rows = settle.campaign_rows(df, campaign)
    rows = rows[(rows["slt"] == slt) & (rows["seed"] == campaign.seed)]
    positive = rows.loc[rows["lam"] > 0, "lam"]
    x0 = float(positive.min()) / 10 if len(positive) else 0.01
    top = float(positive.max()) if len(positive) else 1.0
    fig = Figure(figsize=(4.0 * len(settle.BLOCKS), 7.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(settle.BLOCKS), sharex=True, sharey="row", squeeze=False)
    for j, (imp, init) in enumerate(settle.BLOCKS):
        for i, criterion in enumerate(settle.CRITERIA):
            ax = axes[i][j]
            for k, lr2 in enumerate(campaign.lr2s):
                colour = COLOURS[k % len(COLOURS)]
                same = rows[
                    (rows["init"] == init) & rows["lr2"].map(functools.partial(math.isclose, lr2))
                ]
                line = same[same["importance"] == imp].sort_values("lam")
                zero = same[same["lam"] == 0]
                if not line.empty:
                    ax.plot(line["lam"], line[f"{criterion}.union"], marker="o", markersize=3,
                            color=colour, label=f"ε2 = {lr2:g}")  # fmt: skip
                if not zero.empty:
                    ax.plot([x0], [zero[f"{criterion}.union"].iloc[0]], marker="s",
                            color=colour, linestyle="none")  # fmt: skip
            ax.axvline(x0, color="0.6", linestyle=":", linewidth=1)
            ax.set_xscale("log")
            decades = [10.0**e for e in range(round(math.log10(x0)) + 1, int(math.log10(top)) + 1)]
            ticks = [x0, *decades[:: max(1, len(decades) // 6)]]
            ax.set_xticks(ticks, ["0", *map(lam_tick, ticks[1:])])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            if i == 0:
                ax.set_title(f"{settle.IMPORTANCE_NAME[imp]}, init {init}", fontsize=10)
            if i == 1:
                ax.set_xlabel("λ (MaSQ: mean convention)")
            if j == 0:
                ax.set_ylabel(f'"{criterion}" D1∪D2 test accuracy')
    axes[0][0].legend(fontsize=8, loc="best")
    hidden = campaign.hidden(slt)
    fig.suptitle(f"{slt}: seed 0, 784-{'-'.join(map(str, hidden))}-10; λ = 0 at the left edge "
                 "(squares)", fontsize=10)  # fmt: skip
    return fig


def winner_runs(
    winners: pd.DataFrame, df: pd.DataFrame, slt: str, criterion: str
) -> dict[str, str]:
    """{legend label: run id} of ``slt``'s test-selected winners of ``criterion`` per init:
    the FIM winner, the MaSQ winner, the no-EWC winner (ε2 tuned) and λ = 0 at the MaSQ
    winner's ε2 (when stored); each run drawn once (a winner at λ = 0 may be the no-EWC one)."""
    stored = set(df["run_id"])
    runs: dict[str, str] = {}
    part = winners[(winners["slt"] == slt) & (winners["criterion"] == criterion)]
    rows = records(part)
    for w in rows:
        rid = str(w["run_ids"]).split(",")[0]
        if rid in runs.values():
            continue
        if w["importance"] == "none":
            runs[f"{w['init']}: no EWC, ε2 tuned: {w['lr2']:g}"] = rid
            continue
        name = method_label({"importance": w["importance"], "lam": w["lam"], "scale": "mean"})
        runs[f"{w['init']}: {name}, ε2 {w['lr2']:g}, λ {w['lam']:g}"] = rid
    for w in rows:
        if w["importance"] == "masq":
            zero = run_id(settle.reseeded(settle.winner_row(df, w), [winner_seed(w)], lam=0.0)[0])
            if zero in stored and zero not in runs.values():
                runs[f"{w['init']}: no EWC, ε2 {w['lr2']:g}"] = zero
    return dict(sorted(runs.items()))


def winner_seed(winner: Any) -> int:
    """The seed of a seed-0 winner's run (its seed list has one seed)."""
    return int(str(winner["seed_list"]).split(",")[0])


def winner_figures(root: str | os.PathLike[str], winners: pd.DataFrame, df: pd.DataFrame,
                   slt: str, out: Path) -> list[Path]:  # fmt: skip
    """``winners_<SLT>_<criterion>_<init>.png``: :func:`masq.report.figures.curves_figure`
    of :func:`winner_runs`, one figure per criterion and init."""
    from masq.report.figures import curves_figure

    paths = []
    for criterion in settle.CRITERIA:
        for init in dict.fromkeys(winners.loc[winners["slt"] == slt, "init"]):
            sub = winners[winners["init"] == init]
            runs = winner_runs(sub, df, slt, criterion)
            if not runs:
                continue
            results = {label: load_result(root, rid) for label, rid in runs.items()}
            title = f'{slt}, init {init}: the "{criterion}" winners selected on test (seed 0)'
            fig = curves_figure(results, title=title)
            name = f"winners_{slt.replace('/', '_')}_{criterion}_{init}.png"
            paths.append(save_png(fig, out / name))
    return paths


def missing_notes(
    df: pd.DataFrame, values: pd.DataFrame, campaign: settle.Campaign, slts: Sequence[str],
    results: str,
) -> list[str]:  # fmt: skip
    """One line per part not (fully) stored, naming the ``masq table1`` stage that runs it."""
    stored = set(df["run_id"]) if not df.empty else set()
    notes = []
    for slt in slts:
        command = f"`masq table1 --results {results} --slt {slt} --stage"
        plane = [run_id(c) for c in settle.plane_configs(campaign, slt)]
        have = sum(r in stored for r in plane)
        if have < len(plane):
            notes.append(f"{slt}: {have} of {len(plane)} plane runs stored; {command} plane`")
        rising = settle.extension_plan(df, campaign, slt) if not df.empty else []
        if rising:
            notes.append(f"{slt}: {len(rising)} series still rise at their largest λ; "
                         f"{command} extend`")  # fmt: skip
        part = values[(values["slt"] == slt) & (values["seed"] != campaign.seed)]
        if not part.empty:
            counterpart = part.apply(settle.has_counterpart, axis=1)
            lacking = int(part["value"].isna().sum()) + int(
                (counterpart & part["lam0"].isna()).sum()
            )
            if lacking:
                notes.append(f"{slt}: {lacking} confirmation values missing; {command} confirm`")
    return notes


def write_outputs(
    root: str | os.PathLike[str],
    df: pd.DataFrame,
    out: str | os.PathLike[str],
    campaign: settle.Campaign,
    slts: Sequence[str],
) -> tuple[list[str], list[Path]]:
    """Write every file of the module docstring for ``slts`` into ``out`` from the stored runs
    ``df`` of results dir ``root``; (notes on what is missing, the paths written)."""
    out = Path(out)
    written: list[Path] = []
    settled_parts, value_parts, winners_by = [], [], {}
    for select_on in settle.SELECT_ON:
        winners = select_winners(df, campaign, select_on)
        if not winners.empty:
            winners = winners[winners["slt"].isin(slts)]
        winners_by[select_on] = winners
        values = (
            settle.confirmation_values(winners, df, campaign)
            if not winners.empty
            else pd.DataFrame(columns=[*settle.KEYS, "seed", "run_id", "value", "lam0"])
        )
        settled = settle.settled_table(winners, values, campaign) if not winners.empty else None
        value_parts.append(values)
        if settled is not None:
            settled_parts.append(settled)
    values = pd.concat(value_parts, ignore_index=True)
    notes = missing_notes(df, values, campaign, slts, str(root))
    tail = ("\n" + "\n".join(f"- not stored yet: {n}" for n in notes) + "\n") if notes else ""
    settled = pd.concat(settled_parts, ignore_index=True) if settled_parts else pd.DataFrame()
    for select_on in settle.SELECT_ON:
        part = settled[settled["select_on"] == select_on] if not settled.empty else settled
        stem = out / f"table1_settled_{select_on}"
        md = (settled_markdown(part, select_on, campaign.confirm_seeds) if not part.empty
              else "(no seed-0 runs stored)\n")  # fmt: skip
        written.append(atomic_write(stem.with_suffix(".md"), md + tail))
        written.append(atomic_write(stem.with_suffix(".csv"), part.to_csv(index=False)))
    paired = paired_tests(values, campaign) if not values.empty else pd.DataFrame()
    paired_md = (paired_markdown(paired) if not paired.empty
                 else "(no pair of confirmed FIM and MaSQ winners stored)\n")  # fmt: skip
    written.append(atomic_write(out / "paired.md", paired_md + tail))
    written.append(atomic_write(out / "paired.csv", paired.to_csv(index=False)))
    gains = (gain_tests(values, settled, campaign) if not values.empty
             else pd.DataFrame())  # fmt: skip
    gain_md = (gain_markdown(gains) if not gains.empty
               else "(no pair of confirmed EWC and no-EWC winners stored)\n")  # fmt: skip
    written.append(atomic_write(out / "gain.md", gain_md + tail))
    written.append(atomic_write(out / "gain.csv", gains.to_csv(index=False)))
    infl = settle.inflation(settled) if not settled.empty else pd.DataFrame()
    infl_md = inflation_markdown(infl) if not infl.empty else "(no cells)\n"
    written.append(atomic_write(out / "inflation.md", infl_md + tail))
    written.append(atomic_write(out / "inflation.csv", infl.to_csv(index=False)))
    rows = settle.campaign_rows(df, campaign)
    for slt in slts:
        if rows.empty or not ((rows["slt"] == slt) & (rows["seed"] == campaign.seed)).any():
            continue
        written.append(save_png(plane_figure(df, campaign, slt), out / f"plane_{slt}.png"))
        if not winners_by["test"].empty:
            written += winner_figures(root, winners_by["test"], df, slt, out)
    return notes, written
