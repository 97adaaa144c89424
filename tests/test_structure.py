"""masq analyze kfac: the comparison of the Fisher's structures (masq.analysis.structure)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

import masq.data
from masq.analysis import structure
from masq.analysis.paired import paired_test
from masq.cli import main
from masq.config import RunConfig
from masq.errors import ConfigError
from masq.runid import run_id
from masq.store import load
from tests.synthetic import learnable_dataset


@pytest.fixture
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """masq.data.load gives a tiny learnable MNIST-shaped dataset (no disk, no network)."""
    ds = learnable_dataset(n_train=300, n_val=50, n_test=100)
    monkeypatch.setattr(masq.data, "load", lambda *a, **k: ds)


def test_configs_cover_every_measure_lambda_and_seed_once() -> None:
    base = RunConfig(slt="D5-5", hidden=(8,), lr2=1e-3)
    configs = structure.structure_configs(base, [1.0, 10.0], 3, samples=50)
    assert len(configs) == 3 * (1 + 4 * 2)
    assert len({run_id(c) for c in configs}) == len(configs)
    assert all(c.eval_val for c in configs)
    fisher = [c for c in configs if c.importance in ("fisher", "kfac", "fisher-blocks")]
    assert {(c.fisher_labels.value, c.fisher_samples) for c in fisher} == {("exact", 50)}
    masq_runs = [c for c in configs if c.importance == "masq"]
    assert {c.fisher_samples for c in masq_runs} == {0}  # MaSQ on every sample, its own way
    assert sorted(structure.structure_of(c.to_dict()) for c in configs if c.seed == 0) == sorted(
        ["no EWC", *[m for m in structure.STRUCTURES for _ in range(2)]]
    )


def test_the_cli_names_the_structures_of_the_analysis() -> None:
    from masq.cli import analyze_kfac

    assert analyze_kfac.STRUCTURES == tuple(structure.STRUCTURES)


def test_configs_refuse_unknown_measures_and_no_seeds() -> None:
    base = RunConfig(slt="D5-5", hidden=(8,))
    with pytest.raises(ConfigError, match="unknown measures"):
        structure.structure_configs(base, [1.0], 2, measures=["K-FAC", "Hessian"])
    with pytest.raises(ConfigError, match="seeds"):
        structure.structure_configs(base, [1.0], 0)


def _frame() -> pd.DataFrame:
    """Three seeds; λ = 10 is best on validation for the diagonal, λ = 100 on test (so a
    selection on test would differ); K-FAC one point above the diagonal on every seed."""
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.01), (2, -0.01)):
        common = {"slt": "D5-5", "hidden": "8", "scenario": "class", "seed": seed}
        rows.append(common | {"measure": "no EWC", "lam": 0.0, "val": 0.5, "test": 0.5 + 3 * shift})
        for lam, val, test in ((10.0, 0.80, 0.70), (100.0, 0.75, 0.78)):
            rows.append(common | {"measure": structure.DIAGONAL, "lam": lam, "val": val,
                                  "test": test + shift})  # fmt: skip
            rows.append(common | {"measure": "K-FAC", "lam": lam, "val": val,
                                  "test": test + shift + 0.01 * (seed + 1)})  # fmt: skip
    return pd.DataFrame(rows)


def test_table_chooses_lambda_on_validation_and_pairs_by_seed() -> None:
    table = structure.structure_table(_frame()).set_index("measure")
    diag, kfac = table.loc[structure.DIAGONAL], table.loc["K-FAC"]
    assert diag["lam"] == 10.0 and kfac["lam"] == 10.0  # not 100, the best on test
    assert diag["test_mean"] == pytest.approx(0.70)
    assert diag["test_std"] == pytest.approx(0.01)
    want = paired_test([0.71, 0.73, 0.72], [0.70, 0.71, 0.69])
    assert kfac["diff"] == pytest.approx(want["mean_diff"]) == pytest.approx(0.02)
    assert kfac["p"] == pytest.approx(want["p"])
    assert math.isnan(diag.get("diff", math.nan))
    assert table.loc["no EWC", "seeds"] == 3


def test_a_lambda_chosen_at_the_edge_of_the_sweep_is_marked() -> None:
    """In _frame() λ = 10 (the smaller of two) wins for both measures: marked "bottom" and ▼
    with the note; with a third, smaller λ swept it is inside the sweep and unmarked."""
    assert structure.sweep_edge(1e12, [1.0, 1e6, 1e12]) == "top"
    assert structure.sweep_edge(1.0, [1.0, 1e6, 1e12]) == "bottom"
    assert structure.sweep_edge(1e6, [1.0, 1e6, 1e12]) == ""
    assert structure.sweep_edge(0.0, [0.0, 1.0, 10.0]) == "" == structure.sweep_edge(5.0, [5.0])
    table = structure.structure_table(_frame())
    assert set(table.set_index("measure")["edge"]) == {"bottom", ""}  # "" for no EWC
    text = structure.structure_markdown(table)
    assert "| 10 ▼ |" in text and "▲ / ▼: the λ chosen is the largest / smallest" in text
    frame = _frame()
    low = frame[frame["lam"] == 100.0].assign(lam=1.0, val=0.1)
    table = structure.structure_table(pd.concat([frame, low], ignore_index=True))
    assert set(table["edge"]) == {""}
    assert "▼" not in structure.structure_markdown(table)


def test_diverged_runs_are_never_chosen_nor_averaged() -> None:
    frame = _frame()
    row = frame[frame["measure"] == "K-FAC"].iloc[0].to_dict()
    diverged = row | {"lam": 1000.0, "val": math.nan, "test": math.nan}
    frame = pd.concat([frame, pd.DataFrame([diverged])], ignore_index=True)
    nan_seed = (frame["measure"] == structure.DIAGONAL) & (frame["lam"] == 10.0)
    frame.loc[nan_seed & (frame["seed"] == 2), ["val", "test"]] = math.nan
    table = structure.structure_table(frame).set_index("measure")
    assert table.loc["K-FAC", "lam"] == 10.0  # the NaN λ is not the winner
    assert table.loc[structure.DIAGONAL, "seeds"] == 2  # the diverged seed is left out
    assert table.loc[structure.DIAGONAL, "test_mean"] == pytest.approx(0.705)


def test_tuning_seeds_choose_lambda_alone_and_every_seed_counts_there() -> None:
    """With tune_seeds 1, λ is chosen on seed 0's validation accuracy; the mean is over every
    seed stored at that λ. Seed 0 of _frame() made to prefer λ = 100 on validation, the others
    to prefer 10: with tuning λ = 100 over 3 seeds, without it 10."""
    frame = _frame()
    zero = (frame["seed"] == 0) & (frame["lam"] == 100.0)
    frame.loc[zero, "val"] = 0.9
    tuned = structure.structure_table(frame, tune_seeds=1).set_index("measure")
    assert tuned.loc[structure.DIAGONAL, "lam"] == 100.0
    assert tuned.loc[structure.DIAGONAL, "seeds"] == 3
    assert tuned.loc[structure.DIAGONAL, "test_mean"] == pytest.approx(0.78)
    assert tuned.loc[structure.DIAGONAL, "edge"] == "top"
    full = structure.structure_table(frame).set_index("measure")
    assert full.loc[structure.DIAGONAL, "lam"] == 10.0  # (0.9 + 0.75 + 0.75) / 3 < 0.8
    assert structure.chosen_lambda(frame, tune_seeds=1) == {("D5-5", "8", "class"): 100.0}
    # seed 1 ran at λ = 100 only (as a held seed does): it counts there, chooses nothing
    held = frame[~((frame["seed"] == 1) & (frame["lam"] == 10.0))]
    again = structure.structure_table(held, tune_seeds=1).set_index("measure")
    assert again.loc[structure.DIAGONAL, "lam"] == 100.0 and again.loc[structure.DIAGONAL,
                                                                       "seeds"] == 3  # fmt: skip


def test_frame_needs_validation_metrics() -> None:
    df = pd.DataFrame({"slt": ["D5-5"], "hidden": ["8"], "importance": ["fisher"], "lam": [1.0],
                       "seed": [0], "last.union": [0.5]})  # fmt: skip
    with pytest.raises(ConfigError, match="--eval-val"):
        structure.structure_frame(df)


def test_frame_reads_validation_and_test_accuracy_from_their_own_columns() -> None:
    """``last_val.union`` is the TEST accuracy at the point the validation curve selects;
    the validation accuracy that selects λ is ``last_val.val_union``."""
    df = pd.DataFrame({"slt": ["D5-5"], "hidden": ["8"], "importance": ["fisher"], "lam": [1.0],
                       "seed": [0], "last.union": [0.5], "last_val.union": [0.5],
                       "last_val.val_union": [0.7]})  # fmt: skip
    frame = structure.structure_frame(df)
    assert (frame["val"].iloc[0], frame["test"].iloc[0]) == (0.7, 0.5)


def test_outputs_are_written(tmp_path: Path) -> None:
    frame = _frame()
    table = structure.structure_table(frame)
    md, written = structure.write_outputs(table, frame, tmp_path, body={"command": "x"})
    assert "K-FAC" in md and "+2.00" in md
    assert {p.name for p in written} >= {"kfac.md", "kfac.csv", "kfac.png", "kfac.json"}
    assert (tmp_path / "kfac.png").stat().st_size > 5000
    assert (tmp_path / "kfac_lambda.png").stat().st_size > 5000
    assert json.loads((tmp_path / "kfac.json").read_text(encoding="utf-8"))["command"] == "x"


def test_analyze_kfac_end_to_end(
    tmp_path: Path, tiny_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    res = tmp_path / "kfac"
    args = ["analyze", "kfac", "--slt", "D5-5", "--hidden", "6", "--seeds", "2", "--iters1",
            "20", "--iters2", "10", "--eval-every", "5", "--masq-batch", "50", "--lam-max",
            "10", "--fisher-samples", "40", "--results", str(res), "--workers", "1",
            "--threads", "1", "--no-progress"]  # fmt: skip
    assert main([*args, "--blocks-window", "0"]) == 0
    out = capsys.readouterr().out
    assert "kfac: 14 runs" in out  # 2 seeds × (1 + 3 measures × 2 λ), then the blocks
    assert "FIM blocks of D5-5: λ " in out  # at the diagonal's chosen λ only (window 0)
    table = pd.read_csv(res / "kfac.csv").set_index("measure")
    assert table.loc["FIM blocks", "lam"] == table.loc["diagonal FIM", "lam"]
    assert main([*args, "--blocks-window", "2"]) == 0  # the whole (two-value) grid, resumed
    out = capsys.readouterr().out
    table = pd.read_csv(res / "kfac.csv")
    assert set(table["measure"]) == {*structure.STRUCTURES, "no EWC"}
    assert table["seeds"].eq(2).all()
    assert main([*args, "--tabulate"]) == 0  # tabulates what is stored, runs nothing
    assert "done:" not in capsys.readouterr().out


def test_analyze_kfac_with_tuning_seeds_end_to_end(
    tmp_path: Path, tiny_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tune-seeds 1: the sweeps on seed 0 (and no EWC on both seeds), then seed 1 of each
    measure at the λ chosen on seed 0's validation sets only."""
    res = tmp_path / "kfac"
    args = ["analyze", "kfac", "--slt", "D5-5", "--hidden", "6", "--seeds", "2", "--iters1",
            "20", "--iters2", "10", "--eval-every", "5", "--masq-batch", "50", "--lam-max",
            "100", "--fisher-samples", "40", "--measures", "diagonal FIM", "MaSQ (mean)",
            "--tune-seeds", "1", "--results", str(res), "--workers", "1", "--threads", "1",
            "--no-progress"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "with --tune-seeds 1: 8 runs" in out and "then 2 runs" in out  # 2 + 2 × 3; 2 × 1
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done: 8 runs now" in out and "kfac: 2 runs of the other seeds" in out
    assert "done: 2 runs now" in out
    table = pd.read_csv(res / "kfac.csv").set_index("measure")
    assert table["seeds"].eq(2).all()
    points = pd.read_csv(res / "kfac_points.csv")
    for measure in ("diagonal FIM", "MaSQ (mean)"):
        runs = points[points["measure"] == measure]
        zero = runs[runs["seed"] == 0]
        assert len(zero) == 3 and runs[runs["seed"] == 1]["lam"].tolist() == [
            table.loc[measure, "lam"]
        ]
        best = zero[zero["val"] == zero["val"].max()]["lam"].min()  # smallest on ties
        assert best == table.loc[measure, "lam"]
    assert json.loads((res / "kfac.json").read_text(encoding="utf-8"))["runs"] == 10
    assert "partial" not in out
    df = load(res)  # one held run lost: the study is partial again
    (res / "runs" / f"{df[(df['seed'] == 1) & (df['lam'] > 0)]['run_id'].iloc[0]}.json").unlink()
    assert main([*args, "--tabulate"]) == 0
    assert "partial: 9 of 10 runs stored" in capsys.readouterr().out


def test_the_report_shows_the_comparison(tmp_path: Path) -> None:
    from masq.report import build_report

    frame = _frame()
    table = structure.structure_table(frame)
    body = {"command": "masq analyze kfac --slt D5-5", "seeds": 3, "lams": [10.0, 100.0],
            "runs": 15, "slts": [{"slt": "D5-5", "hidden": "8", "lr2": 1e-3}]}  # fmt: skip
    structure.write_outputs(table, frame, tmp_path / "an", body=body)
    report = build_report([tmp_path / "an"], tmp_path / "page")
    (part,) = [p for p in report.parts if p.id == "kfac"]
    assert part.present and part.figures and "masq analyze kfac" in part.command
    assert any("K-FAC" in str(t) for t in part.tables)
    (tmp_path / "an" / "kfac.json").unlink()  # without it, the part names its command
    (tmp_path / "an" / "lambda.json").write_text(
        json.dumps({"format": "masq-analysis", "analysis": "lambda", "files": {}}), "utf-8"
    )
    missing = build_report([tmp_path / "an"], tmp_path / "page2")
    (empty,) = [p for p in missing.parts if p.id == "kfac"]
    assert not empty.present and "masq analyze kfac" in empty.missing


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("analysis", ["kfac", "lambda"])
def test_analyses_take_the_device(
    tmp_path: Path, analysis: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["analyze", analysis, "--slt", "D5-5", "--hidden", "6", "--seeds", "1", "--lam-max",
            "10", "--results", str(tmp_path / "r"), "--dry-run", "--device"]  # fmt: skip
    assert main([*args, "cuda"]) == 2  # the runs' device, checked before anything runs
    assert "device 'cuda': no CUDA GPU is visible here" in capsys.readouterr().err
