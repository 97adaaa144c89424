"""Table 1, settled (masq.analysis.settle, masq.report.settled, `masq table1`) on stored
records built by hand: selection on seed 0 only, confirmation configs, the settled numbers,
paired tests, inflation, λ conventions, extension decisions, the CLI."""

from __future__ import annotations

import dataclasses
import importlib
import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from scipy import stats

from masq import store
from masq.analysis import paired as pairs
from masq.analysis import settle
from masq.cli import main
from masq.config import RunConfig
from masq.grid import canonical, expand, grid_from_mapping
from masq.protocol.result import build_result
from masq.report import settled as settled_report
from masq.report.settled import lam_tick, select_winners, winner_runs
from masq.runid import run_id
from masq.store import Store

U = "D1∪D2"
C = settle.CAMPAIGN
estimate_module = importlib.import_module("masq.grid.estimate")


def campaign_config(**fields: Any) -> RunConfig:
    """A canonical run of the campaign (D5-5 at 800-800 unless given)."""
    values: dict[str, Any] = {"slt": "D5-5", "lr2": 1e-4, "lam": 10.0, "importance": "fisher",
                              "init": "torch", "seed": 0} | fields  # fmt: skip
    values = {"eval_val": True, "eval_schedule": "dense-early", "precision": "bf16"} | values
    values["hidden"] = C.hidden(values["slt"])
    if values["lam"] == 0:
        values["importance"] = "none"
    return canonical(RunConfig(**values).validate())


def add_run(
    st: Store,
    *,
    best: float,
    last: float,
    val: tuple[float, float] = (0.5, 0.5),
    **fields: Any,
) -> str:
    """Store a run whose re-training D1∪D2 test curve is [0.3, best, last] and whose
    validation union curve is [0.2, *val]; its run id."""
    config = campaign_config(**fields)
    d1 = {"iteration": [0, 10], "D1": [0.1, 0.9], "D2": [0.0, 0.0], U: [0.05, 0.45]}
    d2 = {
        "iteration": [0, 10, 20],
        "D1": [0.6, best - 0.1, last - 0.1],
        "D2": [0.0, best + 0.1, last + 0.1],
        U: [0.3, best, last],
        f"val:{U}": [0.2, *val],
    }
    result = build_result(config, [d1, d2], importance=None, train_seconds=[1.0, 2.0],
                          importance_seconds=[0.5], meta={})  # fmt: skip
    return st.write_result(result)


def pick(t: pd.DataFrame, **match: Any) -> pd.Series:
    for k, v in match.items():
        t = t[t[k] == v]
    assert len(t) == 1, t
    return t.iloc[0]


def small_plane(st: Store) -> None:
    """Seed-0 runs of D5-5, FIM, init torch: lr2 1e-3 wins "best", lr2 1e-4 wins "last"."""
    add_run(st, lr2=1e-3, lam=10.0, best=0.80, last=0.60, val=(0.70, 0.40))
    add_run(st, lr2=1e-4, lam=100.0, best=0.75, last=0.70, val=(0.60, 0.65))
    add_run(st, lr2=1e-4, lam=0.0, best=0.50, last=0.40)
    add_run(st, lr2=1e-3, lam=0.0, best=0.55, last=0.45)


# ----------------------------------------------------------------------------- selection


def test_selection_is_per_importance_and_init_on_seed_0_only(tmp_path: Path) -> None:
    st = Store(tmp_path)
    small_plane(st)
    add_run(st, lr2=1e-4, lam=10.0, importance="masq", init="tf", best=0.6, last=0.55)
    # other seeds, which would win if they took part (alone or pooled with seed 0)
    add_run(st, lr2=1e-4, lam=100.0, seed=1, best=0.99, last=0.99)
    add_run(st, lr2=1e-5, lam=1.0, seed=2, best=1.0, last=1.0)
    df = store.load(tmp_path)
    winners = select_winners(df, C, "test")
    best = pick(winners, slt="D5-5", importance="fisher", init="torch", criterion="best")
    last = pick(winners, slt="D5-5", importance="fisher", init="torch", criterion="last")
    assert (best["lr2"], best["lam"], best["acc_mean"]) == (1e-3, 10.0, 0.80)
    assert (last["lr2"], last["lam"], last["acc_mean"]) == (1e-4, 100.0, 0.70)
    assert best["seeds"] == last["seeds"] == 1 and last["lam0_mean"] == 0.40
    masq = pick(winners, importance="masq", init="tf", criterion="last")
    assert masq["lam"] == 10.0  # its own block (λ = 0 of init tf: none stored)
    val = select_winners(df, C, "val")
    vbest = pick(val, importance="fisher", init="torch", criterion="best")
    assert (vbest["lr2"], vbest["acc_mean"]) == (1e-3, 0.80)  # test at the val-selected point


def test_winner_figures_draw_each_run_once(tmp_path: Path) -> None:
    st = Store(tmp_path)
    fim = add_run(st, lr2=1e-4, lam=100.0, best=0.9, last=0.8)
    zero = add_run(st, lr2=1e-4, lam=0.0, best=0.7, last=0.6)
    masq = add_run(st, lr2=1e-4, lam=10.0, importance="masq", best=0.85, last=0.75)
    runs = winner_runs(select_winners(store.load(tmp_path), C, "test"), store.load(tmp_path),
                       "D5-5", "last")  # fmt: skip
    assert sorted(runs.values()) == sorted([fim, zero, masq])  # MaSQ's λ = 0 counterpart
    # a store where λ = 0 beats every MaSQ run: both winners are the λ = 0 run, drawn once
    st2 = Store(tmp_path / "b")
    ids = {add_run(st2, lr2=1e-4, lam=0.0, best=0.7, last=0.6),
           add_run(st2, lr2=1e-4, lam=10.0, importance="masq", best=0.5, last=0.5)}  # fmt: skip
    df2 = store.load(tmp_path / "b")
    runs2 = winner_runs(select_winners(df2, C, "test"), df2, "D5-5", "last")
    assert len(runs2) == len(set(runs2.values())) == 1 and set(runs2.values()) < ids


def test_rows_outside_the_campaign_are_ignored(tmp_path: Path) -> None:
    st = Store(tmp_path)
    small_plane(st)
    add_run(st, lr2=1e-4, lam=5.0, precision="fp32", best=1.0, last=1.0)
    add_run(st, lr2=1e-4, lam=5.0, importance="masq", scale="sum", best=1.0, last=1.0)
    rows = settle.campaign_rows(store.load(tmp_path), C)
    assert len(rows) == 4 and (rows["precision"] == "bf16").all()


# ----------------------------------------------------------------------------- confirmation


def test_confirmation_configs_change_the_seed_only(tmp_path: Path) -> None:
    st = Store(tmp_path)
    small_plane(st)
    df = store.load(tmp_path)
    winners = select_winners(df, C, "test")
    configs = settle.confirmation_configs(winners, df, (1, 2, 3, 4))
    best_cfg = campaign_config(lr2=1e-3, lam=10.0)
    last_cfg = campaign_config(lr2=1e-4, lam=100.0)
    expected = {run_id(dataclasses.replace(c, seed=s)) for c in (best_cfg, last_cfg)
                for s in (1, 2, 3, 4)}  # fmt: skip
    # the λ = 0 counterpart of the "last" winner, as `masq grid` would give it
    grid = grid_from_mapping({"slt": "D5-5", "hidden": [[800, 800]], "lr2": 1e-4, "lam": [0],
                              "importance": ["fisher", "masq"], "seeds": [1, 2, 3, 4],
                              "eval_val": True, "eval_schedule": "dense-early",
                              "precision": "bf16"})  # fmt: skip
    zeros = {run_id(c) for c in expand(grid)}
    assert len(zeros) == 4
    # the no-EWC winners (λ = 0 only, ε2 selected): lr2 1e-3 on both criteria
    tuned = {run_id(campaign_config(lr2=1e-3, lam=0.0, seed=s)) for s in (1, 2, 3, 4)}
    assert {run_id(c) for c in configs} == expected | zeros | tuned
    assert all(c.importance == "none" for c in configs if c.lam == 0)


# ----------------------------------------------------------------------------- settled numbers

# seeds 1-4 of the "last" winner (FIM, lr2 1e-4, λ 100), of its λ = 0 counterpart and of the
# MaSQ "last" winner (lr2 1e-4, λ 1000)
FIM_LAST = (0.61, 0.64, 0.58, 0.66)
ZERO_LAST = (0.40, 0.42, 0.39, 0.43)
MASQ_LAST = (0.65, 0.66, 0.60, 0.71)


def confirmed_store(root: Path) -> Store:
    st = Store(root)
    small_plane(st)
    add_run(st, lr2=1e-4, lam=1000.0, importance="masq", best=0.72, last=0.71)
    add_run(st, lr2=1e-4, lam=10.0, importance="masq", best=0.5, last=0.5)
    for seed, f, z, m in zip((1, 2, 3, 4), FIM_LAST, ZERO_LAST, MASQ_LAST, strict=True):
        add_run(st, lr2=1e-4, lam=100.0, seed=seed, best=0.9, last=f)
        add_run(st, lr2=1e-4, lam=0.0, seed=seed, best=0.9, last=z)
        add_run(st, lr2=1e-4, lam=1000.0, importance="masq", seed=seed, best=0.9, last=m)
    return st


def settled(root: Path, select_on: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    df = store.load(root)
    winners = select_winners(df, C, select_on)
    values = settle.confirmation_values(winners, df, C)
    return settle.settled_table(winners, values, C), values


def test_settled_table_against_a_hand_computation(tmp_path: Path) -> None:
    confirmed_store(tmp_path)
    table, _ = settled(tmp_path)
    fim = pick(table, importance="fisher", init="torch", criterion="last")
    assert fim["seed0"] == 0.70 and fim["n"] == 4
    assert fim["mean"] == pytest.approx(sum(FIM_LAST) / 4)
    assert fim["std"] == pytest.approx(statistics.stdev(FIM_LAST))  # sample std, ddof 1
    assert fim["lam0_seed0"] == 0.40
    assert fim["lam0_mean"] == pytest.approx(statistics.mean(ZERO_LAST))
    assert fim["lam0_std"] == pytest.approx(statistics.stdev(ZERO_LAST))
    best = pick(table, importance="fisher", init="torch", criterion="best")
    assert best["seed0"] == 0.80 and best["n"] == 0 and math.isnan(best["mean"])  # not re-run
    md = settled_report.settled_markdown(table, "test", C.confirm_seeds)
    text = f"70.00 ({100 * statistics.mean(FIM_LAST):.2f} ± {100 * statistics.stdev(FIM_LAST):.2f}"
    assert text in md and "80.00 (not run)" in md


def test_lambda_conventions(tmp_path: Path) -> None:
    assert settle.lam_sum(1e5, "masq", 1000) == 100.0
    assert settle.lam_mean(100.0, 1000) == 1e5
    assert settle.lam_sum(0.0, "masq", 1000) == 0.0
    assert math.isnan(settle.lam_sum(1e5, "fisher", 1000))
    confirmed_store(tmp_path)
    table, _ = settled(tmp_path)
    masq = pick(table, importance="masq", init="torch", criterion="last")
    fim = pick(table, importance="fisher", init="torch", criterion="last")
    assert masq["lam"] == 1000.0 and masq["lam_sum"] == 1.0  # λ_mean / B_MaSQ
    assert math.isnan(fim["lam_sum"])
    md = settled_report.settled_markdown(table, "test", C.confirm_seeds)
    assert "| D5-5 | last | 784-800-800-10 | 0.0001 | 1000 | 1 | EWC+MaSQ (mean) |" in md
    assert "| D5-5 | last | 784-800-800-10 | 0.0001 | 100 | — | EWC+FIM |" in md


def test_paired_test_against_a_hand_computation() -> None:
    masq, fim = [0.65, 0.66, 0.60, 0.71], [0.61, 0.64, 0.58, 0.66]
    d = [a - b for a, b in zip(masq, fim, strict=True)]
    mean, sd = statistics.mean(d), statistics.stdev(d)
    t = mean / (sd / 2)
    out = pairs.paired_test(masq, fim)
    assert out["t"] == pytest.approx(t)
    assert out["p"] == pytest.approx(stats.ttest_rel(masq, fim).pvalue)
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(t), 3))
    assert out["mean_diff"] == pytest.approx(mean)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3}
    assert (out["ci_low"], out["ci_high"]) == (
        pytest.approx(mean - half),
        pytest.approx(mean + half),
    )
    assert math.isnan(pairs.paired_test([0.5], [0.4])["p"])


def test_paired_tests_and_inflation_of_the_store(tmp_path: Path) -> None:
    confirmed_store(tmp_path)
    table, values = settled(tmp_path)
    paired = pairs.paired_tests(values, C)
    row = pick(paired, select_on="test", criterion="last", init="torch")
    assert row["n"] == 4 and row["seeds"] == "1,2,3,4"
    assert row["t"] == pytest.approx(stats.ttest_rel(MASQ_LAST, FIM_LAST).statistic)
    assert (paired["criterion"] == "best").sum() == 0  # "best" winners not confirmed
    infl = settle.inflation(table)
    fim = pick(infl, importance="fisher", criterion="last")
    assert fim["inflation"] == pytest.approx(0.70 - statistics.mean(FIM_LAST))
    zero_luck = 0.40 - statistics.mean(ZERO_LAST)
    assert fim["lam0_inflation"] == pytest.approx(zero_luck)
    assert fim["net"] == pytest.approx(0.70 - statistics.mean(FIM_LAST) - zero_luck)
    masq = pick(infl, importance="masq", criterion="last")
    assert masq["inflation"] == pytest.approx(0.71 - statistics.mean(MASQ_LAST))
    assert masq["lam0_inflation"] == pytest.approx(zero_luck)  # the same λ = 0 runs
    best = pick(infl, importance="fisher", criterion="best")
    assert math.isnan(best["lam0_inflation"]) and math.isnan(best["net"])
    md = settled_report.inflation_markdown(infl)
    assert f"| {100 * (0.70 - statistics.mean(FIM_LAST)):.2f} | {100 * zero_luck:.2f} |" in md


# ----------------------------------------------------------------------------- no EWC, tuned

# seeds 1-4 of the no-EWC "last" winner (λ = 0 at lr2 1e-3, tuned over ε2 on seed 0)
TUNED_LAST = (0.50, 0.47, 0.52, 0.49)


def test_no_ewc_winner_is_tuned_over_lr2_at_lambda_0_on_seed_0(tmp_path: Path) -> None:
    st = Store(tmp_path)
    small_plane(st)  # λ = 0: lr2 1e-3 (best 0.55, last 0.45) beats 1e-4 (0.50, 0.40)
    add_run(st, lr2=1e-5, lam=0.0, seed=1, best=0.99, last=0.99)  # another seed: ignored
    add_run(st, lr2=1e-3, lam=0.0, init="tf", best=0.3, last=0.2)
    add_run(st, lr2=1e-4, lam=0.0, init="tf", best=0.2, last=0.25)
    winners = select_winners(store.load(tmp_path), C, "test")
    none = winners[winners["importance"] == "none"]
    assert len(none) == 4  # 2 inits × 2 criteria
    got = {(r["init"], r["criterion"]): (r["lr2"], r["lam"], r["acc_mean"])
           for r in none.to_dict("records")}  # fmt: skip
    assert got == {("torch", "best"): (1e-3, 0.0, 0.55), ("torch", "last"): (1e-3, 0.0, 0.45),
                   ("tf", "best"): (1e-3, 0.0, 0.3), ("tf", "last"): (1e-4, 0.0, 0.25)}  # fmt: skip
    ewc = pick(winners, importance="fisher", init="torch", criterion="last")
    assert (ewc["lr2"], ewc["lam"]) == (1e-4, 100.0)  # the EWC blocks are unchanged


def gain_store(root: Path) -> Store:
    st = confirmed_store(root)
    for seed, value in zip((1, 2, 3, 4), TUNED_LAST, strict=True):
        add_run(st, lr2=1e-3, lam=0.0, seed=seed, best=0.9, last=value)
    return st


def test_gain_over_the_tuned_no_ewc_winner_against_a_hand_computation(tmp_path: Path) -> None:
    gain_store(tmp_path)
    table, values = settled(tmp_path)
    none = pick(table, importance="none", init="torch", criterion="last")
    assert none["lr2"] == 1e-3 and none["seed0"] == 0.45
    assert none["mean"] == pytest.approx(statistics.mean(TUNED_LAST))
    assert none["lam0_n"] == 0  # no counterpart of its own
    gains = pairs.gain_tests(values, table, C)
    fim = pick(gains, select_on="test", criterion="last", init="torch", importance="fisher")
    d = [a - b for a, b in zip(FIM_LAST, TUNED_LAST, strict=True)]
    assert fim["mean_diff"] == pytest.approx(statistics.mean(d))
    assert fim["p"] == pytest.approx(stats.ttest_rel(FIM_LAST, TUNED_LAST).pvalue)
    assert (fim["lr2"], fim["lam"], fim["none_lr2"]) == (1e-4, 100.0, 1e-3)
    assert fim["mean"] == pytest.approx(statistics.mean(FIM_LAST))
    assert fim["none_mean"] == pytest.approx(statistics.mean(TUNED_LAST))
    masq = pick(gains, select_on="test", criterion="last", init="torch", importance="masq")
    assert masq["p"] == pytest.approx(stats.ttest_rel(MASQ_LAST, TUNED_LAST).pvalue)
    md = pairs.gain_markdown(gains)
    assert f"| {100 * statistics.mean(d):.2f} |" in md and "| FIM | 0.0001 | 100 |" in md
    settled_md = settled_report.settled_markdown(table, "test", C.confirm_seeds)
    block = settled_md.split("**no EWC, init torch**")[1]
    mean, std = 100 * statistics.mean(TUNED_LAST), 100 * statistics.stdev(TUNED_LAST)
    assert f"| 45.00 ({mean:.2f} ± {std:.2f}, n = 4) |  |" in block  # no λ = 0 cell


def test_pairs_use_the_seeds_both_sides_have(tmp_path: Path) -> None:
    confirmed_store(tmp_path)  # the no-EWC "last" winner has no confirmation runs
    table, values = settled(tmp_path)
    paired = pairs.paired_tests(values, C)
    assert pick(paired, select_on="test", criterion="last", init="torch")["n"] == 4
    assert pairs.gain_tests(values, table, C).empty  # nothing to pair with


# ----------------------------------------------------------------------------- extension


def test_next_lambda_decisions() -> None:
    assert settle.next_lambda([0.1, 1, 10], [0.5, 0.6, 0.7], 1e16) == 100.0
    assert settle.next_lambda([0.1, 1, 10], [0.5, 0.8, 0.7], 1e16) is None  # falls at the top
    assert settle.next_lambda([1, 10], [0.7, 0.7], 1e16) is None  # flat: not rising
    assert settle.next_lambda([1e14, 1e15], [0.5, 0.6], 1e16) == 1e16
    assert settle.next_lambda([1e15, 1e16], [0.5, 0.6], 1e16) is None  # the cap
    assert settle.next_lambda([1, 10], [0.5, math.nan], 1e16) is None  # diverged
    assert settle.next_lambda([0, 10], [0.1, 0.5], 1e16) is None  # λ = 0 is not in a series


def test_extension_plan_and_configs(tmp_path: Path) -> None:
    st = Store(tmp_path)
    for lam, last in ((1.0, 0.5), (10.0, 0.6), (100.0, 0.7)):  # rising at its top
        add_run(st, lr2=1e-4, lam=lam, best=0.9, last=last)
    for lam, last in ((1.0, 0.5), (10.0, 0.8), (100.0, 0.7)):  # falling
        add_run(st, lr2=1e-3, lam=lam, best=0.9, last=last)
    add_run(st, lr2=1e-4, lam=1000.0, seed=1, best=0.9, last=0.1)  # seed 1: ignored
    df = store.load(tmp_path)
    plan = settle.extension_plan(df, C, "D5-5")
    assert plan == [{"lr2": 1e-4, "importance": "fisher", "init": "torch", "lam": 1000.0}]
    configs = settle.extension_configs(df, C, "D5-5")
    assert [run_id(c) for c in configs] == [run_id(campaign_config(lr2=1e-4, lam=1000.0))]
    assert settle.extension_plan(df, dataclasses.replace(C, lam_cap=100.0), "D5-5") == []


def test_plane_is_the_campaign_grid() -> None:
    configs = settle.plane_configs(C, "DP10-10")
    # 4 ε2 × (12 λ > 0 × 2 importances × 2 inits + λ = 0 × 2 inits)
    assert len(configs) == 4 * (12 * 2 * 2 + 2)
    assert {c.hidden for c in configs} == {(800, 800, 200)}
    assert {str(c.scale) for c in configs} == {"mean"} and {c.seed for c in configs} == {0}
    assert max(c.lam for c in configs) == 1e10


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("command", ["table1", "export", "import"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main([command, "--help"])
    assert err.value.code == 0
    assert f"usage: masq {command}" in capsys.readouterr().out


def test_dry_run_counts_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(estimate_module, "measure", lambda *a, **kw: dict.fromkeys(
        ("d1_iter", "d2_iter", "d2_iter_one", "eval_sample_one", "eval_sample_stack",
         "importance_sample"), 1e-4))  # fmt: skip
    root = tmp_path / "r"
    args = ["table1", "--results", str(root), "--slt", "D9-1", "--dry-run", "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "D9-1 plane: 200 runs; stored already: 0; to run: 200" in out
    assert "D9-1 extend: 0 runs" in out and "D9-1 confirm: 0 runs" in out
    plane = out.split("D9-1 plane: 200 runs")[1].split("estimated time with 1 worker(s) x ")[1]
    value, unit = plane.split(": ")[1].split(" (")[0].split(" ")
    plane_h = float(value) / {"s": 3600, "min": 60, "h": 1}[unit]
    total_h = float(out.split("in all: ")[1].split(" h")[0])
    assert total_h == pytest.approx(plane_h, abs=0.01)
    assert not (root / "runs").exists()


def test_report_stage_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = tmp_path / "r", tmp_path / "out"
    confirmed_store(root)
    assert main(["table1", "--results", str(root), "--out", str(out), "--slt", "D5-5",
                 "--stage", "report"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "--slt D5-5 --stage plane`" in printed  # the plane is incomplete: named
    names = {"table1_settled_test.md", "table1_settled_val.csv", "paired.md", "paired.csv",
             "gain.md", "gain.csv", "inflation.md", "inflation.csv", "plane_D5-5.png"}  # fmt: skip
    assert names <= {p.name for p in out.iterdir()}
    assert any(p.name.startswith("winners_D5-5_last") for p in out.iterdir())
    table = pd.read_csv(out / "table1_settled_test.csv")
    row = pick(table, importance="fisher", init="torch", criterion="last")
    assert row["mean"] == pytest.approx(statistics.mean(FIM_LAST))
    assert "not stored yet" in (out / "table1_settled_test.md").read_text(encoding="utf-8")
    assert (out / "plane_D5-5.png").read_bytes()[:4] == b"\x89PNG"


TICKS = [(0.1, "0.1"), (1.0, "1"), (100.0, "100"), (1e3, "1e3"), (1e9, "1e9"), (1e11, "1e11"),
         (3162.27766, "3162.28")]  # fmt: skip


@pytest.mark.parametrize(("lam", "label"), TICKS)
def test_plane_ticks_are_compact_decades(lam: float, label: str) -> None:
    assert lam_tick(lam) == label


def test_the_table1_command_names_the_campaign_defaults() -> None:
    from masq.analysis.settle import CAMPAIGN
    from masq.cli import table1_cmd

    assert table1_cmd.DEFAULT_SLTS == tuple(CAMPAIGN.slts)
    assert table1_cmd.DEFAULT_SEEDS == tuple(CAMPAIGN.confirm_seeds)
