"""masq.report: Table 1 selection logic on hand-made result records (no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from masq import report, results
from masq.errors import ConfigError
from masq.experiment import ExperimentConfig, Result, best_and_last
from masq.results import Store, run_id

U = "D1∪D2"


def add(
    store: Store,
    *,
    best: float,
    last: float,
    val: tuple[float, float] | None = None,
    **fields: object,
) -> str:
    """Store a run whose re-training D1∪D2 curve is [0.3, best, last] (iterations 0, 10, 20);
    with ``val``, its validation union curve is [0.3, *val]."""
    values = {"hidden": (200, 200), "lr2": 1e-3, "lam": 100.0, "importance": "masq"}
    values.update(fields)
    if values["lam"] == 0:
        values["importance"] = "none"
    config = ExperimentConfig(**values, eval_val=val is not None)  # type: ignore[arg-type]
    curve = {
        "iteration": [0, 10, 20],
        "D1": [0.6, best - 0.1, last - 0.1],
        "D2": [0.0, best + 0.1, last + 0.1],
        U: [0.3, best, last],
    }
    if val is not None:
        curve[f"val:{U}"] = [0.3, *val]
    b, lst = best_and_last(curve)
    store.write_result(Result(config, {"iteration": [0], U: [0.5]}, curve, b, lst))
    return run_id(config)


def table(root: Path, **kw: object) -> pd.DataFrame:
    return report.table1(results.load(root), **kw)  # type: ignore[arg-type]


def rows(t: pd.DataFrame, criterion: str, **match: object) -> pd.Series:
    sel = t[t["criterion"] == criterion]
    for k, v in match.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1
    return sel.iloc[0]


def test_best_last_and_lambda_zero(tmp_path: Path) -> None:
    s = Store(tmp_path)
    add(s, best=0.90, last=0.50, hidden=(400, 400), lam=1000.0)  # peaks high, then forgets
    add(s, best=0.80, last=0.75, hidden=(200, 200), lam=100.0)  # ends best
    add(s, best=0.70, last=0.60, hidden=(200, 200), lam=0.0)  # the same without EWC
    add(s, best=0.65, last=0.40, hidden=(400, 400), lam=0.0)
    t = table(tmp_path)
    best, last = rows(t, "best"), rows(t, "last")
    assert (best["hidden"], best["lam"], best["acc_mean"]) == ("400-400", 1000.0, 0.90)
    assert (last["hidden"], last["lam"], last["acc_mean"]) == ("200-200", 100.0, 0.75)
    assert last["lam0_mean"] == 0.60 and best["iteration"] == 10 and last["iteration"] == 20
    assert best["d1_mean"] == pytest.approx(0.80) and best["d2_mean"] == pytest.approx(1.0)
    md = report.to_markdown(t)
    assert "selected on the TEST curves" in md and "784-400-400-10" in md and "60.00" in md
    assert "| architecture | init |" in md and "| 784-400-400-10 | torch |" in md
    grouped = report.to_markdown(table(tmp_path, group_by=["init"]), ["init"])
    assert "| SLT | init | criterion | architecture | ε2 |" in grouped  # init shown once


def test_ties_prefer_smaller_lambda_then_fewer_parameters(tmp_path: Path) -> None:
    s = Store(tmp_path)
    add(s, best=0.8, last=0.7, hidden=(800, 800), lam=100.0)
    add(s, best=0.8, last=0.7, hidden=(200, 200), lam=1000.0)
    add(s, best=0.8, last=0.7, hidden=(400, 400), lam=100.0)
    t = table(tmp_path)
    assert (rows(t, "best")["hidden"], rows(t, "best")["lam"]) == ("400-400", 100.0)
    assert rows(t, "last")["hidden"] == "400-400"
    assert pytest.approx(rows(t, "last")["lam0_mean"], nan_ok=True) != 0  # no λ = 0 run: NaN
    assert "| — |" in report.to_markdown(t)


def test_several_seeds_select_by_mean(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for seed, (b, lst) in enumerate([(0.95, 0.45), (0.55, 0.50)]):  # mean best 0.75
        add(s, best=b, last=lst, seed=seed, hidden=(800, 800))
    for seed, (b, lst) in enumerate([(0.78, 0.70), (0.80, 0.74)]):  # mean best 0.79
        add(s, best=b, last=lst, seed=seed, hidden=(200, 200))
    for seed, lst in enumerate([0.6, 0.62]):
        add(s, best=lst, last=lst, seed=seed, hidden=(200, 200), lam=0.0)
    t = table(tmp_path)
    best, last = rows(t, "best"), rows(t, "last")
    assert best["hidden"] == "200-200" and best["seeds"] == 2
    assert best["acc_mean"] == pytest.approx(0.79)
    assert best["acc_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert last["lam0_mean"] == pytest.approx(0.61)
    assert "79.00 ± 1.41" in report.to_markdown(t)


def test_per_slt_rows(tmp_path: Path) -> None:
    s = Store(tmp_path)
    add(s, best=0.9, last=0.8, slt="D5-5")
    add(s, best=0.7, last=0.6, slt="D9-1")
    add(s, best=0.6, last=0.5, slt="DP10-10", hidden=(800, 800))
    t = table(tmp_path)
    assert list(t["slt"]) == ["D5-5", "D5-5", "D9-1", "D9-1", "DP10-10", "DP10-10"]
    assert list(t["criterion"]) == ["best", "last"] * 3


def test_select_on_validation(tmp_path: Path) -> None:
    s = Store(tmp_path)
    # A wins on the test curves, B on the validation curves
    add(s, best=0.90, last=0.80, val=(0.60, 0.55), hidden=(400, 400))
    add(s, best=0.85, last=0.70, val=(0.80, 0.75), hidden=(200, 200))
    test_t, val_t = table(tmp_path), table(tmp_path, select_on="val")
    assert rows(test_t, "best")["hidden"] == "400-400"
    assert rows(val_t, "best")["hidden"] == "200-200"
    assert rows(val_t, "best")["acc_mean"] == 0.85  # test accuracy at the val-selected point
    assert rows(val_t, "last")["acc_mean"] == 0.70
    assert "VALIDATION" in report.to_markdown(val_t)
    other = tmp_path / "noval"
    add(Store(other), best=0.9, last=0.8)
    with pytest.raises(ConfigError, match="--eval-val"):
        table(other, select_on="val")


def test_group_by_importance_shares_lambda_zero(tmp_path: Path) -> None:
    s = Store(tmp_path)
    add(s, best=0.80, last=0.70, importance="masq")
    add(s, best=0.60, last=0.50, importance="fisher")
    add(s, best=0.65, last=0.65, lam=0.0)
    t = table(tmp_path, group_by=["importance"])
    assert rows(t, "best", importance="masq")["acc_mean"] == 0.80
    fisher_best = rows(t, "best", importance="fisher")
    assert fisher_best["lam"] == 0.0 and fisher_best["acc_mean"] == 0.65  # no EWC beats FIM
    assert rows(t, "last", importance="masq")["lam0_mean"] == 0.65
    md, csv = report.write_table(t, tmp_path / "out", ["importance"])
    assert md.name == "table1_test_by_importance.md" and csv.read_text().startswith("slt,")
    with pytest.raises(ConfigError, match="cannot group by"):
        table(tmp_path, group_by=["lr2"])


def test_consistency_plan(tmp_path: Path) -> None:
    s = Store(tmp_path)
    add(s, best=0.9, last=0.5, lr2=1e-4, lam=1000.0, seed=1)
    add(s, best=0.8, last=0.5, lr2=1e-4, lam=1000.0, seed=0)
    add(s, best=0.7, last=0.6, lr2=1e-3, lam=100.0)
    plan = report.consistency_plan(results.load(tmp_path))
    runs = plan["D5-5"]
    assert set(runs) == {"EWC+MaSQ", "EWC+FIM", "no EWC"}
    assert runs["EWC+MaSQ"]["lr2"] == 1e-4 and runs["EWC+MaSQ"]["seed"] == 0
    assert runs["EWC+FIM"]["importance"] == "fisher" and runs["EWC+FIM"]["lam"] == 10000.0
    assert runs["no EWC"]["lam"] == 0.0 and runs["no EWC"]["importance"] == "none"
    config = ExperimentConfig.from_dict(runs["EWC+MaSQ"])
    assert run_id(config) in set(results.load(tmp_path)["run_id"])
    with pytest.raises(ConfigError, match="criterion"):
        report.consistency_plan(results.load(tmp_path), criterion="median")


def test_report_never_imports_train() -> None:
    code = "import sys, masq.report; sys.exit('masq.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
