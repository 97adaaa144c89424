from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from masq import data
from masq.cli import build_parser, experiment_cmd, main
from masq.experiment import Result
from tests.synthetic import synthetic_dataset

FAST = [
    "--hidden",
    "12",
    "--iters",
    "20",
    "--eval-every",
    "5",
    "--masq-batch",
    "50",
    "--batch-size",
    "25",
    "--device",
    "cpu",
    "--quiet",
]


@pytest.fixture(autouse=True)
def synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dataset name loads the tiny synthetic dataset (no MNIST in unit tests)."""
    dataset = synthetic_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)


def test_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    tb = tmp_path / "tb"
    assert main(["compare", *FAST, "--out", str(out), "--csv", "--tensorboard", str(tb)]) == 0
    printed = capsys.readouterr().out
    for label in ("no EWC", "EWC+FIM", "EWC+MaSQ (mean)", "EWC+MaSQ (sum)"):
        assert label in printed
    names = {p.name for p in out.iterdir()}
    assert names == {
        "compare.md",
        "compare.csv",
        "compare.png",
        "curves.csv",
        "none.json",
        "fisher.json",
        "masq-mean.json",
        "masq-sum.json",
    }
    results = {k: Result.load(out / f"{k}.json") for k in ("none", "fisher", "masq-mean")}
    assert results["none"].curve_d1 == results["fisher"].curve_d1  # one D1 state
    assert results["fisher"].config.lam == pytest.approx(1e5)  # lambda = 1 / lr2 (1e-5)
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["no EWC", "EWC+FIM", "EWC+MaSQ (mean)", "EWC+MaSQ (sum)"]
    assert float(rows[0]["last D1∪D2"]) == results["none"].last["D1∪D2"]
    md = (out / "compare.md").read_text()
    assert md.startswith("| method |") and md.count("\n") == 6
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 4 * 2 * 5 and curves[0].keys() >= {"run", "phase", "step", "D1∪D2"}
    assert {p.name for p in tb.iterdir()} == {"none", "fisher", "masq-mean", "masq-sum"}
    assert any(p.name.startswith("events.out.tfevents") for p in (tb / "fisher").iterdir())
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_writes_a_record_and_a_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", *FAST, "--importance", "fisher", "--lr2", "1e-3", "--lam", "50", "--csv"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.count("\n") == 0 and "best D1∪D2" in printed
    stem = "D5-5_12_fisher_lr2-0.001_lam-50_seed0"
    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}.json", f"{stem}.png", f"{stem}.csv"}
    result = Result.load(tmp_path / f"{stem}.json")
    assert result.config.importance == "fisher" and result.config.lam == 50.0
    assert result.config.iters1 == result.config.iters2 == 20


def test_iters1_and_iters2_override_iters(tmp_path: Path) -> None:
    assert main(["run", *FAST, "--iters1", "10", "--iters2", "15", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    config = Result.load(path).config
    assert (config.iters1, config.iters2) == (10, 15)


@pytest.mark.parametrize(
    ("slt", "hidden", "lr2", "lam"),
    [
        ("D5-5", (800, 800), 1e-5, 1e5),
        ("d9-1", (800, 400, 400), 1e-4, 1e4),
        ("DP10-10", (800, 800, 200), 1e-5, 1e5),
    ],
)
def test_per_slt_defaults(slt: str, hidden: tuple, lr2: float, lam: float) -> None:
    args = build_parser().parse_args(["compare", "--slt", slt])
    config = experiment_cmd.config_from_args(args)
    assert (config.hidden, config.lr2, config.lam) == (hidden, lr2, lam)
    args = build_parser().parse_args(["compare", "--slt", slt, "--hidden", "30", "--lr2", "1e-3"])
    config = experiment_cmd.config_from_args(args)
    assert (config.hidden, config.lr2, config.lam) == ((30,), 1e-3, 1000.0)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr1", "0"], "lr1"),
        (["--lr2=-1e-5"], "lr2"),
        (["--iters", "0"], "iters1"),
        (["--iters2", "-3"], "iters2"),
        (["--batch-size", "0"], "batch_size"),
        (["--masq-batch", "0"], "masq_batch"),
        (["--eval-every", "0"], "eval_every"),
        (["--hidden"], "hidden"),
        (["--hidden", "0", "5"], "hidden"),
        (["--importance", "ewc"], "importance"),
        (["--scale", "median"], "scale"),
        (["--fisher-labels", "x"], "fisher_labels"),
        (["--init", "xavier"], "init"),
        (["--lam", "-1"], "lam"),
        (["--slt", "D2-2-2-2-2"], "two-task"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--threads", "0"], "threads"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    extra: list[str],
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", *FAST, *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("masq: error:") and err.count("\n") == 0 and needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the input is checked


def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["compare", *FAST, "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "existing file" in err and err.count("\n") == 0
    assert target.read_text() == "keep me"


def test_missing_tensorboard_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["run", *FAST, "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install masq-ewc[tensorboard]" in err and err.count("\n") == 0
    assert list(tmp_path.glob("*.json")) == []


def test_ctrl_c_keeps_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_cmd.ex, "retrain_d2", interrupted)
    assert main(["compare", *FAST, "--out", str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
