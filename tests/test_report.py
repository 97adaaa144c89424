"""masq.report: Table 1 selection logic on hand-made result records (no training), the
consistency plan, and the figures of two- and three-task results."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from masq import report, store
from masq.config import RunConfig
from masq.errors import ConfigError
from masq.protocol.result import Result, build_result
from masq.report import figures
from masq.runid import run_id
from masq.store import Store

U = "D1∪D2"
U3 = "D1∪D2∪D3"


def two_task_result(
    config: RunConfig, curve_d2: dict[str, list[float]], curve_d1: dict[str, list[float]] | None
) -> Result:
    curve_d1 = curve_d1 or {
        "iteration": [0, 10],
        "D1": [0.1, 0.9],
        "D2": [0.0, 0.0],
        U: [0.05, 0.45],
    }
    return build_result(
        config,
        [curve_d1, curve_d2],
        importance=None,
        train_seconds=[1.0, 2.0],
        importance_seconds=[0.5],
        meta={},
    )


def add(
    store_: Store,
    *,
    best: float,
    last: float,
    val: tuple[float, float] | None = None,
    **fields: object,
) -> str:
    """Store a two-task run whose re-training D1∪D2 curve is [0.3, best, last] (iterations
    0, 10, 20); with ``val``, its validation union curve is [0.3, *val]."""
    values: dict[str, Any] = {
        "hidden": (200, 200),
        "lr2": 1e-3,
        "lam": 100.0,
        "importance": "masq",
    }
    values.update(fields)
    if values["lam"] == 0:
        values["importance"] = "none"
    config = RunConfig(**values, eval_val=val is not None).validate()
    curve = {
        "iteration": [0, 10, 20],
        "D1": [0.6, best - 0.1, last - 0.1],
        "D2": [0.0, best + 0.1, last + 0.1],
        U: [0.3, best, last],
    }
    if val is not None:
        curve[f"val:{U}"] = [0.3, *val]
    store_.write_result(two_task_result(config, curve, None))
    return run_id(config)


def table(root: Path, **kw: Any) -> pd.DataFrame:
    return report.table1(store.load(root), **kw)


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
    assert best["method"] == "EWC+MaSQ (mean, B=1000)" and best["tasks"] == 2
    md = report.to_markdown(t)
    assert "selected on the TEST curves" in md and "784-400-400-10" in md and "60.00" in md
    assert "| architecture | init |" in md and "| 784-400-400-10 | torch |" in md
    assert "| D1∪D2 % |" in md and "ACC %" not in md and "BWT %" not in md
    assert "forgetting %" not in md
    grouped = report.to_markdown(table(tmp_path, group_by=["init"]), ["init"])
    assert "| SLT | init | criterion | architecture | ε2 |" in grouped  # init shown once


def test_ties_prefer_smaller_lambda_then_fewer_parameters(tmp_path: Path) -> None:
    s = Store(tmp_path)
    add(s, best=0.8, last=0.7, hidden=(800, 800), lam=100.0)
    add(s, best=0.8, last=0.7, hidden=(200, 200), lam=1000.0)
    add(s, best=0.8, last=0.7, hidden=(400, 400), lam=100.0)
    add(s, best=0.5, last=0.5, hidden=(800, 800), lam=0.0)  # λ = 0, another architecture
    t = table(tmp_path)
    assert (rows(t, "best")["hidden"], rows(t, "best")["lam"]) == ("400-400", 100.0)
    last = rows(t, "last")
    assert last["hidden"] == "400-400"
    # no λ = 0 run of 400-400 (only of 800-800): the λ = 0 cells are NaN, shown as a dash
    assert math.isnan(last["lam0_mean"]) and math.isnan(last["lam0_std"])
    line = next(x for x in report.to_markdown(t).splitlines() if x.startswith("| D5-5 | last"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-2] == "—"  # the column "D1∪D2 % with λ = 0", before "seeds"


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
    assert best["hidden"] == "200-200" and best["seeds"] == 2 and best["seed_list"] == "0,1"
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
    plan = report.consistency_plan(store.load(tmp_path))
    runs = plan["D5-5"]
    assert set(runs) == {"EWC+MaSQ", "EWC+FIM", "no EWC"}
    assert runs["EWC+MaSQ"]["lr2"] == 1e-4 and runs["EWC+MaSQ"]["seed"] == 0
    assert runs["EWC+FIM"]["importance"] == "fisher" and runs["EWC+FIM"]["lam"] == 10000.0
    assert runs["no EWC"]["lam"] == 0.0 and runs["no EWC"]["importance"] == "none"
    config = RunConfig.from_dict(runs["EWC+MaSQ"])
    assert run_id(config) in set(store.load(tmp_path)["run_id"])
    with pytest.raises(ConfigError, match="criterion"):
        report.consistency_plan(store.load(tmp_path), criterion="median")


def test_report_never_imports_training_or_torch() -> None:
    """The report reads stored results; it asks the method and measure registries (which
    load torch) for labels only when it builds a table."""
    code = (
        "import sys, masq.report; "
        "sys.exit(any(m in sys.modules for m in ('masq.training', 'masq.protocol', "
        "'masq.stacked', 'masq.grid', 'torch')))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------------- three tasks


def three_task_curves(
    r: Sequence[Sequence[float]], final_union: Sequence[float]
) -> list[dict[str, list[float]]]:
    """Phase curves (iterations 0, 10, 20) whose last values are the rows of ``r``; the final
    phase's union of all tasks is ``final_union``; phase 2 also has D1∪D2."""
    curves = []
    for i, row in enumerate(r):
        curve: dict[str, list[float]] = {"iteration": [0, 10, 20]}
        for j, value in enumerate(row):
            curve[f"D{j + 1}"] = [0.05, 0.5 * value, value]
        if i == 1:
            curve[U] = [0.1, 0.2, (row[0] + row[1]) / 2]
        curve[U3] = list(final_union) if i == 2 else [0.1, 0.2, sum(row) / 3]
        curves.append(curve)
    return curves


def add3(
    store_: Store, r: Sequence[Sequence[float]], final_union: Sequence[float], **fields: Any
) -> RunConfig:
    values: dict[str, Any] = {
        "slt": "D3-3-4",
        "hidden": (200, 200),
        "lr2": 1e-3,
        "lam": 100.0,
        "importance": "masq",
        "iters1": 20,
        "iters2": 20,
        "eval_every": 10,
    }
    values.update(fields)
    if values["lam"] == 0:
        values["importance"] = "none"
    config = RunConfig(**values).validate()
    result = build_result(
        config,
        three_task_curves(r, final_union),
        importance=None,
        train_seconds=[1.0, 1.0, 1.0],
        importance_seconds=[0.5, 0.5],
        meta={},
    )
    store_.write_result(result)
    return config


# Accuracy matrices R[i][j] (after phase i, on task j) and, by hand from them:
# ACC = mean of the last row; BWT = mean over j < 2 of R[2][j] - R[j][j];
# forgetting = mean over j < 2 of max(R[0][j], R[1][j]) - R[2][j].
R_A0 = [[0.9, 0.0, 0.0], [0.95, 0.8, 0.0], [0.5, 0.6, 0.9]]
ACC_A0, BWT_A0, FGT_A0 = 2.0 / 3, ((0.5 - 0.9) + (0.6 - 0.8)) / 2, ((0.95 - 0.5) + (0.8 - 0.6)) / 2
R_A1 = [[0.8, 0.0, 0.1], [0.6, 0.9, 0.0], [0.7, 0.5, 0.8]]
ACC_A1, BWT_A1, FGT_A1 = 2.0 / 3, ((0.7 - 0.8) + (0.5 - 0.9)) / 2, ((0.8 - 0.7) + (0.9 - 0.5)) / 2
R_B = [[0.9, 0.0, 0.0], [0.92, 0.9, 0.0], [0.2, 0.3, 0.95]]
ACC_B, BWT_B, FGT_B = 1.45 / 3, ((0.2 - 0.9) + (0.3 - 0.9)) / 2, ((0.92 - 0.2) + (0.9 - 0.3)) / 2
R_ZERO = [[0.9, 0.0, 0.0], [0.1, 0.9, 0.0], [0.0, 0.1, 0.95]]


def three_task_store(root: Path) -> None:
    s = Store(root)
    # A (200-200, two seeds): ends best (mean last 0.74); B (400-400): peaks highest (0.9)
    add3(s, R_A0, [0.3, 0.80, 0.75], seed=0)
    add3(s, R_A1, [0.3, 0.78, 0.73], seed=1)
    add3(s, R_B, [0.3, 0.90, 0.50], hidden=(400, 400))
    add3(s, R_ZERO, [0.3, 0.45, 0.40], lam=0.0)


def test_table1_of_three_task_runs_reports_the_winners_transfer_metrics(tmp_path: Path) -> None:
    three_task_store(tmp_path)
    df = store.load(tmp_path)
    assert set(df["tasks"]) == {3}
    t = report.table1(df)
    assert {"average_accuracy", "bwt", "forgetting"} <= set(t.columns)
    best, last = rows(t, "best"), rows(t, "last")
    assert (best["hidden"], best["seeds"], best["tasks"]) == ("400-400", 1, 3)
    assert best["acc_mean"] == 0.90 and best["iteration"] == 10
    assert best["average_accuracy"] == pytest.approx(ACC_B, rel=1e-12)
    assert best["bwt"] == pytest.approx(BWT_B, rel=1e-12)
    assert best["forgetting"] == pytest.approx(FGT_B, rel=1e-12)
    assert (last["hidden"], last["seeds"]) == ("200-200", 2)
    assert last["acc_mean"] == pytest.approx((0.75 + 0.73) / 2, rel=1e-12)
    assert last["average_accuracy"] == pytest.approx((ACC_A0 + ACC_A1) / 2, rel=1e-12)
    assert last["bwt"] == pytest.approx((BWT_A0 + BWT_A1) / 2, rel=1e-12)  # -0.275
    assert last["forgetting"] == pytest.approx((FGT_A0 + FGT_A1) / 2, rel=1e-12)  # 0.2875
    assert last["lam0_mean"] == 0.40
    assert best["d1_mean"] == pytest.approx(0.5 * 0.2) and best["d2_mean"] == pytest.approx(0.15)

    md = report.to_markdown(t)
    header = next(x for x in md.splitlines() if x.startswith("| SLT"))
    assert "| ACC % | BWT % | forgetting % | seeds |" in header
    assert "| all tasks % |" in header and "D1∪D2 %" not in header
    line = next(x for x in md.splitlines() if x.startswith("| D3-3-4 | last"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-4:] == ["66.67", "-27.50", "28.75", "2"]
    line = next(x for x in md.splitlines() if x.startswith("| D3-3-4 | best"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-4:] == ["48.33", "-65.00", "66.00", "1"]


def test_markdown_shows_transfer_columns_when_some_slt_has_more_than_two_tasks(
    tmp_path: Path,
) -> None:
    three_task_store(tmp_path)
    add(Store(tmp_path), best=0.9, last=0.8, slt="D5-5")
    t = table(tmp_path)
    assert sorted(set(t["slt"])) == ["D3-3-4", "D5-5"]
    md = report.to_markdown(t)
    assert "ACC %" in md and "BWT %" in md and "forgetting %" in md
    # the two-task row has its own R: [[0.9, 0.0], [0.7, 0.9]] (curves' last values)
    line = next(x for x in md.splitlines() if x.startswith("| D5-5 | last"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-4:] == ["80.00", "-20.00", "20.00", "1"]


# ----------------------------------------------------------------------------- figures


def three_task_result(lam: float = 100.0) -> Result:
    config = RunConfig(
        slt="D3-3-4", hidden=(8,), iters1=10, iters2=20, eval_every=5, lam=lam
    ).validate()
    curves = three_task_curves(R_A0, [0.3, 0.8, 0.75])
    curves[0]["iteration"] = [0, 5, 10]  # phase 1 runs iters1 = 10 iterations
    return build_result(
        config, curves, importance=None, train_seconds=[1, 1, 1], importance_seconds=[1], meta={}
    )


def visible_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_visible()]


def test_curves_figure_of_three_tasks_draws_each_phase_at_its_offset() -> None:
    result = three_task_result()
    assert figures.phase_offsets(result) == [0, 10, 30]  # 0, iters1, iters1 + iters2
    fig = figures.curves_figure({"EWC": result})
    axes = visible_axes(fig)
    assert len(fig.axes) == 6 and len(axes) == 4  # D1, D2, D3, the union; 2 x 3 grid
    titles = [f"test accuracy on {name}" for name in ("D1", "D2", "D3", U3)]
    assert [ax.get_title() for ax in axes] == titles
    for ax, name in zip(axes, ("D1", "D2", "D3", U3), strict=True):
        lines = {tuple(line.get_xdata()): list(line.get_ydata()) for line in ax.get_lines()}
        assert set(lines) == {(0, 5, 10), (10, 20, 30), (30, 40, 50)}
        for start, curve in zip((0, 10, 30), result.curves, strict=True):
            xs = tuple(start + it for it in curve["iteration"])
            assert lines[xs] == curve[name]
        assert ax.get_xlim() == (0.0, 50.0)
    assert "D3-3-4" in fig._suptitle.get_text()  # type: ignore[union-attr]


def test_accuracy_figure_of_three_tasks() -> None:
    result = three_task_result()
    fig = figures.accuracy_figure(result)
    assert len(fig.axes) == 2  # the heat map and its colour bar
    ax = fig.axes[0]
    cells = [t.get_text() for t in ax.texts]
    assert cells == [f"{100 * v:.1f}" for row in R_A0 for v in row]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["D1", "D2", "D3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["after D1", "after D2", "after D3"]
    title = fig._suptitle.get_text()  # type: ignore[union-attr]
    expected = (
        f"ACC {100 * ACC_A0:.1f} %, BWT {100 * BWT_A0:.1f} %, forgetting {100 * FGT_A0:.1f} %"
    )
    assert title == f"D3-3-4, EWC+MaSQ (mean): {expected}"
    assert expected == "ACC 66.7 %, BWT -30.0 %, forgetting 32.5 %"
    image = ax.get_images()[0].get_array()
    assert image.tolist() == R_A0


def test_curves_figure_of_two_tasks_keeps_the_papers_three_panels(tmp_path: Path) -> None:
    config = RunConfig(hidden=(8,), iters1=10, iters2=20, eval_every=10).validate()
    d1 = {"iteration": [0, 10], "D1": [0.1, 0.9], "D2": [0.0, 0.0], U: [0.05, 0.45]}
    curves_d2 = {
        "EWC+MaSQ (mean)": {"iteration": [0, 10, 20], "D1": [0.9, 0.8, 0.7], "D2": [0.0, 0.5,
                            0.9], U: [0.45, 0.65, 0.8]},
        "no EWC": {"iteration": [0, 10, 20], "D1": [0.9, 0.3, 0.1], "D2": [0.0, 0.9, 1.0],
                   U: [0.45, 0.6, 0.55]},
    }  # fmt: skip
    results = {
        label: two_task_result(config.with_(lam=0.0) if label == "no EWC" else config, c, d1)
        for label, c in curves_d2.items()
    }
    fig = figures.curves_figure(results)
    axes = visible_axes(fig)
    assert len(fig.axes) == 3 and len(axes) == 3
    assert [ax.get_title() for ax in axes] == [f"test accuracy on {n}" for n in ("D1", "D2", U)]
    for ax, name in zip(axes, ("D1", "D2", U), strict=True):
        lines = [(tuple(x.get_xdata()), list(x.get_ydata()), x.get_label()) for x in ax.get_lines()]
        # the shared task-1 phase once, then each method's phase 2 from iters1 = 10 on
        assert lines[0] == ((0, 10), d1[name], "training on D1")
        assert lines[1:] == [((10, 20, 30), c[name], label) for label, c in curves_d2.items()]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["training on a later task", "training on D1", "EWC+MaSQ (mean)", "no EWC"]
    path = figures.plot_results(results, tmp_path / "two.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("fields", "label"),
    [
        ({"importance": "masq"}, "EWC+MaSQ (mean, B=1000)"),
        ({"importance": "masq", "scale": "sum", "masq_batch": 500}, "EWC+MaSQ (sum, B=500)"),
        ({"importance": "fisher"}, "EWC+FIM"),
        ({"importance": "fisher", "fisher_labels": "sampled"}, "EWC+FIM (sample)"),
        ({"importance": "masq", "consolidation": "online-ewc", "gamma": 0.5},
         "online EWC+MaSQ (mean, B=1000)"),
        ({"importance": "fisher", "consolidation": "online-ewc"}, "online EWC+FIM"),
        ({"lam": 0.0}, "no EWC"),
    ],
)  # fmt: skip
def test_table1_names_the_winners_method(
    fields: dict[str, Any], label: str, tmp_path: Path
) -> None:
    add3(Store(tmp_path), R_A0, [0.3, 0.8, 0.75], **fields)
    t = table(tmp_path)
    assert list(t["method"]) == [label, label]
    assert f"| {label} |" in report.to_markdown(t)
