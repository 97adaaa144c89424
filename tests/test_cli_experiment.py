"""``masq run`` and ``masq compare`` end to end on tiny synthetic data (no MNIST)."""

from __future__ import annotations

import csv
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from masq import data, protocol
from masq.cli import build_parser, experiment_cmd, main
from masq.config import RunConfig
from masq.protocol import Result
from masq.protocol.result import load_weights
from masq.runid import run_id
from masq.training import eval_counts
from tests.synthetic import learnable_dataset, synthetic_dataset

# the modules (masq.protocol's functions of the same names hide them as attributes)
protocol_compare = importlib.import_module("masq.protocol.compare")
protocol_phases = importlib.import_module("masq.protocol.phases")
PNG = b"\x89PNG\r\n\x1a\n"
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


def stem_in(directory: Path, prefix: str) -> str:
    """The file stem of the one record in ``directory``: the readable ``prefix``, then the
    run id (two runs never share a name)."""
    (path,) = directory.glob("*.json")
    assert path.stem == f"{prefix}_{run_id(Result.load(path).config)}"
    return path.stem


@pytest.fixture(autouse=True)
def synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dataset name loads the tiny synthetic dataset (no MNIST in unit tests)."""
    dataset = synthetic_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)


def parse(*argv: str) -> RunConfig:
    return experiment_cmd.config_from_args(build_parser().parse_args(list(argv)))


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
        "meta.json",  # --out is also a results directory (masq table, masq report)
        "runs",
    }
    results = {k: Result.load(out / f"{k}.json") for k in ("none", "fisher", "masq-mean")}
    assert results["none"].curves[0] == results["fisher"].curves[0]  # one D1 state
    assert results["fisher"].config.lam == 100000.0  # lambda = 1 / lr2 (1e-5), exactly
    assert results["none"].config.lam == 0.0
    assert results["masq-mean"].config.importance == "masq"
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["no EWC", "EWC+FIM", "EWC+MaSQ (mean)", "EWC+MaSQ (sum)"]
    assert float(rows[0]["last D1∪D2"]) == results["none"].last["D1∪D2"]
    assert float(rows[1]["last D1"]) == results["fisher"].accuracy[1][0]
    md = (out / "compare.md").read_text()
    assert md.startswith("| method |") and md.count("\n") == 6
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 4 * 2 * 5 and curves[0].keys() >= {"run", "phase", "step", "D1∪D2"}
    d2_rows = [r for r in curves if r["run"] == "fisher" and r["phase"] == "D2"]
    assert [int(r["step"]) for r in d2_rows] == [20, 25, 30, 35, 40]  # iters1 + iteration
    assert {p.name for p in tb.iterdir()} == {"none", "fisher", "masq-mean", "masq-sum"}
    assert any(p.name.startswith("events.out.tfevents") for p in (tb / "fisher").iterdir())
    assert (out / "compare.png").read_bytes()[:8] == PNG


def test_run_writes_a_record_and_a_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", *FAST, "--importance", "fisher", "--lr2", "1e-3", "--lam", "50", "--csv"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    summary, wrote = capsys.readouterr().out.strip().splitlines()
    assert "best D1∪D2" in summary and "EWC+FIM" in summary and wrote.startswith("wrote ")
    stem = stem_in(tmp_path, "D5-5_12_fisher_lr2-0.001_lam-50_seed0")
    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}.json", f"{stem}.png", f"{stem}.csv"}
    result = Result.load(tmp_path / f"{stem}.json")
    assert result.config.importance == "fisher" and result.config.lam == 50.0
    assert result.config.iters1 == result.config.iters2 == 20
    assert result.config.hidden == (12,) and result.config.device == "cpu"
    assert f"last {result.last['D1∪D2']:.4f}" in summary
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG


def test_iters1_and_iters2_override_iters(tmp_path: Path) -> None:
    assert main(["run", *FAST, "--iters1", "10", "--iters2", "15", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    config = Result.load(path).config
    assert (config.iters1, config.iters2) == (10, 15)


@pytest.mark.parametrize(
    ("slt", "hidden", "lr2", "lam"),
    [
        ("D5-5", (800, 800), 1e-5, 100000.0),
        ("d9-1", (800, 400, 400), 1e-4, 10000.0),
        ("DP10-10", (800, 800, 200), 1e-5, 100000.0),
        ("D2-2-2-2-2", (800, 800), 1e-3, 1000.0),  # not the paper's: D5-5's net, ε2 = lr1
    ],
)
def test_per_slt_defaults(slt: str, hidden: tuple[int, ...], lr2: float, lam: float) -> None:
    for command in ("run", "compare"):
        config = parse(command, "--slt", slt)
        assert (config.hidden, config.lr2, config.lam) == (hidden, lr2, lam)
        assert config.slt == slt.upper() and config.device == "auto"
        config = parse(command, "--slt", slt, "--hidden", "30", "--lr2", "1e-3")
        assert (config.hidden, config.lr2, config.lam) == ((30,), 1e-3, 1000.0)


def test_lambda_defaults_to_one_over_lr2_and_a_given_lambda_wins() -> None:
    assert parse("run", "--lr2", "3e-4").lam == 3333.33333333  # 1 / 3e-4 to 12 digits
    assert parse("run", "--lr2", "1e-6").lam == 1000000.0
    assert parse("run", "--lr2", "1e-3", "--lam", "7").lam == 7.0
    assert parse("run", "--lam", "0").lam == 0.0


@pytest.mark.parametrize("words", [["800-800"], ["800x800"]], ids="|".join)
def test_hidden_as_one_word(words: list[str]) -> None:
    assert parse("run", "--hidden", *words).hidden == (800, 800)
    assert parse("compare", "--hidden", *words).hidden == (800, 800)


def test_registry_flags_reach_the_config() -> None:
    config = parse(
        "run",
        "--init",
        "tf",
        "--scale",
        "sum",
        "--eval-val",
        "--seed",
        "4",
        "--dataset",
        "fashion-mnist",
        "--masq-batch",
        "10",
    )
    assert (config.init, config.scale) == ("tf", "sum")
    labels = parse("run", "--importance", "fisher", "--fisher-labels", "exact").fisher_labels
    assert labels == "exact"
    assert config.eval_val is True and config.seed == 4 and config.dataset == "fashion-mnist"
    assert config.masq_batch == 10 and config.consolidation == "ewc"


@pytest.mark.parametrize("flag", ["--ewc", "--consolidation"])
@pytest.mark.parametrize("value", ["online", "online-ewc"])
def test_online_ewc_flags(flag: str, value: str) -> None:
    config = parse("run", flag, value, "--gamma", "0.5")
    assert config.consolidation == "online-ewc" and config.gamma == 0.5
    assert parse("run", flag, "plain").consolidation == "ewc"


def test_online_ewc_run_records_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", *FAST, "--slt", "D4-3-3", "--ewc", "online", "--gamma", "0.5"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    stem = stem_in(tmp_path, "D4-3-3_12_online-masq-mean-g0.5_lr2-0.001_lam-1000_seed0")
    result = Result.load(tmp_path / f"{stem}.json")
    assert result.config.consolidation == "online-ewc" and result.config.gamma == 0.5
    assert "online EWC+MaSQ (mean)" in capsys.readouterr().out


def test_run_of_five_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = learnable_dataset(n_train=200, n_val=20, n_test=100)
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)
    argv = ["run", "--slt", "D2-2-2-2-2", "--hidden", "8", "--iters", "20", "--eval-every", "10"]
    argv += ["--masq-batch", "50", "--device", "cpu", "--quiet", "--save-weights"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    stem = stem_in(tmp_path, "D2-2-2-2-2_8_masq-mean_lr2-0.001_lam-1000_seed0")
    weights = [f"{stem}_phase{t}.safetensors" for t in range(1, 6)]
    expected = {f"{stem}.json", f"{stem}.png", f"{stem}_accuracy.png", *weights}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert (tmp_path / f"{stem}_accuracy.png").read_bytes()[:8] == PNG
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG
    result = Result.load(tmp_path / f"{stem}.json")
    assert result.config.n_tasks == 5 and len(result.curves) == 5
    r = result.accuracy

    # the printed accuracy matrix: one row per phase, R[i][j] in % with one decimal
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("R[i][j] %"))
    assert lines[head].split()[2:] == ["D1", "D2", "D3", "D4", "D5"]
    for i in range(5):
        row = lines[head + 1 + i]
        assert row.startswith(f"after D{i + 1} ")
        assert [float(v) for v in row.split()[2:]] == [round(100 * v, 1) for v in r[i]]

    # ACC, BWT and forgetting computed here from R
    acc = sum(r[4]) / 5
    bwt = sum(r[4][j] - r[j][j] for j in range(4)) / 4
    forgetting = sum(max(r[i][j] for i in range(4)) - r[4][j] for j in range(4)) / 4
    assert result.metrics["average_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert result.metrics["bwt"] == pytest.approx(bwt, abs=1e-12)
    assert result.metrics["forgetting"] == pytest.approx(forgetting, abs=1e-12)
    match = re.search(r"ACC (-?[\d.]+) %, BWT (-?[\d.]+) %, forgetting (-?[\d.]+) %", printed)
    assert match is not None
    assert match.groups() == (f"{100 * acc:.2f}", f"{100 * bwt:.2f}", f"{100 * forgetting:.2f}")

    # the weights: T files, equal to those of the same run made in-process
    states = [load_weights(tmp_path / name) for name in weights]
    again = protocol.run(result.config)
    assert again.weights is not None and len(again.weights) == 5
    for saved, kept in zip(states, again.weights, strict=True):
        assert saved.keys() == kept.keys()
        assert all(torch.equal(saved[k], kept[k]) for k in saved)
    assert again.accuracy == r
    # ... and the last phase's weights give the recorded final accuracies
    tasks = protocol.make_tasks(result.config)
    model = protocol.build_model(result.config, tasks)
    model.load_state_dict(states[-1])
    counts = eval_counts(model, {t.name: t.test for t in tasks})
    assert [c / n for c, n in counts.values()] == r[4]
    assert not torch.equal(states[0]["0.weight"], states[-1]["0.weight"])  # it trained


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
        (["--seed", "-1"], "seed"),
        (["--hidden"], "hidden"),
        (["--hidden", "0", "5"], "hidden"),
        (["--hidden", "800-"], "hidden"),
        (["--importance", "ewc"], "importance"),
        (["--scale", "median"], "scale"),
        (["--fisher-labels", "x"], "fisher_labels"),
        (["--init", "xavier"], "init"),
        (["--consolidation", "offline"], "consolidation"),
        (["--ewc", "online", "--gamma", "1.5"], "gamma"),
        (["--gamma", "-0.1"], "gamma"),
        (["--lam", "-1"], "lam"),
        (["--lam", "inf"], "lam"),
        (["--slt", "D5-4"], "SLT spec"),
        (["--slt", "D10"], "SLT spec"),
        (["--device", "gpu"], "device"),
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


def test_a_value_argparse_cannot_read_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", *FAST, "--lr2", "fast", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "masq run: error: argument --lr2: invalid float value: 'fast'"
    assert not (tmp_path / "o").exists()


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


@pytest.mark.parametrize("command", ["compare", "run"])
def test_ctrl_c_keeps_no_record(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol_compare, "continue_run", interrupted)
    monkeypatch.setattr(protocol_phases, "continue_run", interrupted)
    assert main([command, *FAST, "--out", str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_plan_line_names_lambda_only_for_methods_that_read_it() -> None:
    from masq.cli.experiment_cmd import plan_text

    ewc = parse("run", "--lam", "1000")
    assert ", λ 1000 (given);" in plan_text(ewc, "EWC+MaSQ", " (given)")
    for method in ("joint", "mean-imm"):
        line = plan_text(parse("run", "--consolidation", method), method, "")
        assert "λ" not in line and line.startswith("D5-5, hidden 800-800, ")
