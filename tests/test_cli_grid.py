"""The ``masq grid`` / ``masq table`` / ``masq consistency`` / ``masq migrate`` commands, end
to end (tiny)."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import masq.data
from masq import protocol
from masq.cli import build_parser, main
from masq.cli.grid_cmd import grid_from_args
from masq.config import RunConfig
from masq.store import Store
from tests.synthetic import learnable_dataset
from tests.test_store import write_v1_dir

group_module = importlib.import_module("masq.grid.group")
estimate_module = importlib.import_module("masq.grid.estimate")

TINY = [
    "--preset",
    "none",
    "--slt",
    "D5-5",
    "--hidden",
    "8",
    "6-4",
    "--iters1",
    "10",
    "--iters2",
    "10",
    "--eval-every",
    "5",
    "--batch-size",
    "20",
    "--masq-batch",
    "50",
    "--lr2",
    "1e-2",
    "1e-3",
    "--lam",
    "0",
    "10",
]
FAST = ["--workers", "1", "--threads", "1", "--no-progress"]


@pytest.fixture
def idx_dir(tmp_path: Path, data_fake: Callable) -> Path:
    """A tiny synthetic "mnist" (IDX files) accepted by masq.data for this test."""
    return data_fake("mnist", n_train=5200, n_test=200).write(tmp_path / "idx")


def _fake_measure(weights: dict[tuple[int, ...], float]) -> Callable[..., dict[str, float]]:
    """Costs per unit (seconds) of an architecture: these numbers times its weight."""
    unit = {
        "d1_iter": 0.3,
        "d2_iter": 1.6,
        "d2_iter_one": 0.7,
        "eval_sample_one": 1e-4,
        "eval_sample_stack": 2e-4,
        "importance_sample": 1e-4,
    }

    def measure(hidden: tuple[int, ...], stack: int, *a: Any, **kw: Any) -> dict[str, float]:
        return {k: v * weights[hidden] for k, v in unit.items()}

    return measure


def test_grid_table_consistency_end_to_end(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = str(tmp_path / "res")
    args = ["grid", *TINY, "--results", res, "--data-dir", str(idx_dir), *FAST, "--stack", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "grid: 8 runs (2 hidden × 2 lr2 × 2 λ; 8 combinations" in out
    assert "done: 8 runs now, 0 were stored, 0 failed; 2 task-1 trainings and 2 importance " in out
    assert "phase checkpoint" not in out  # its own were deleted as its runs were stored
    (Path(res) / "phases").mkdir(exist_ok=True)
    (Path(res) / "phases" / "0123456789abcdef0123.pt").write_bytes(b"x" * 3_000_000)
    assert main(args) == 0  # resumed: nothing to do
    out = capsys.readouterr().out
    assert "done: 0 runs now, 8 were stored, 0 failed; 0 task-1 trainings and 0 importance" in out
    assert (
        f"grid: 1 phase checkpoint(s) of runs not in this grid remain in {res}/phases (3 MB): "
        "they resume those runs when their grid runs again; delete them if it will not"
    ) in out

    assert main(["table", "--results", res]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "| D5-5 |" in out and "selected on the TEST curves" in out
    assert "D1∪D2 %" in out and "ACC %" not in out  # two tasks: the paper's columns
    assert (Path(res) / "table1_test.md").exists() and (Path(res) / "table1_test.csv").exists()

    out_dir = tmp_path / "figs"
    cons = ["consistency", "--results", res, "--data-dir", str(idx_dir), "--out", str(out_dir)]
    assert main([*cons, *FAST]) == 0
    out = capsys.readouterr().out
    assert "EWC+FIM" in out and "no EWC" in out and "EWC+MaSQ" in out
    assert (out_dir / "consistency_D5-5.png").stat().st_size > 1000


def test_dry_run_prints_counts_and_the_estimate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(estimate_module, "measure", _fake_measure({(8,): 1.0, (6, 4): 3.0}))
    grid_file = tmp_path / "g.toml"
    grid_file.write_text('importance = ["masq", "fisher"]\nseeds = 2\n', encoding="utf-8")
    args = ["grid", *TINY, "--grid", str(grid_file), "--dry-run", "--workers", "2"]
    assert main([*args, "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 2 seeds x 2 archs x 2 lr2 x (λ = 0 once + λ = 10 for masq and fisher)
    assert lines[0] == (
        "grid: 24 runs (2 seed × 2 hidden × 2 importance × 2 lr2 × 2 λ; 32 combinations, "
        "merged where a setting cannot change the result, e.g. the importance at λ = 0)"
    )
    assert lines[1] == "stored already: 0; to run: 24"
    assert lines[2] == (
        "shared work: 4 task-1 trainings, 8 importance passes, 24 runs in 4 stacks of <= 16"
    )
    assert lines[3] == (
        "calibration: a few iterations of 784-6-4-10, 784-8-10 on this machine (2 of 2 "
        "architectures measured, others interpolated by parameter count)"
    )
    # Per group of weight w (4 groups: w = 1, 3 for each seed; sum of w = 8), D5-5:
    # task 1: 10 iterations x 0.3w + 3 evaluations (0, 5, 10) x 10,000 images x 1e-4w = 6w;
    # importance: 2 passes x 27,500 images x 1e-4w = 5.5w;
    # later phase: one stack of 6 of 16 (its share 6/16) x (10 x 1.6w + 3 x 10,000 x 2e-4w)
    # = 8.25w, of which evaluation 6w x 6/16 = 2.25w; with task 1's 3w evaluation 5.25w.
    # Two workers halve it: 24 + 22 + 33 = 79 s, evaluation 21 s = 27 %.
    assert lines[4] == (
        "estimated time with 2 worker(s) x 1 thread(s): 79 s (task-1 training 24 s, importance "
        "22 s, re-training 33 s; evaluation 27% of it)"
    )
    assert len(lines) == 5


def test_paper_preset_dry_run_counts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from masq import grid

    monkeypatch.setattr(
        grid,
        "estimate",
        lambda *a, **k: grid.Estimate(
            3600.0, 60.0, 6.0, 3534.0, 300.0, 2, 1, ((784, 200, 200, 10),), 36
        ),
    )
    assert main(["grid", "--preset", "paper", "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "grid: 1728 runs (3 slt × 36 hidden × 4 lr2 × 4 λ; 1728 combinations" in out
    assert "108 task-1 trainings, 108 importance passes, 1728 runs in 108 stacks of <= 16" in out
    assert "calibration: a few iterations of 784-200-200-10 on this machine (1 of 36" in out
    assert "60.0 min (task-1 training 60 s, importance 6 s, re-training 58.9 min" in out
    assert "evaluation 8% of it" in out and "1.0 h" not in out


def _grid(*flags: str) -> Any:
    return grid_from_args(build_parser().parse_args(["grid", "--preset", "none", *flags]))


def test_grid_axes_come_from_the_registry() -> None:
    g = _grid(
        "--slt", "D3-3-4", "D5-5", "--seed-list", "3", "5", "--layers", "1", "2",
        "--sizes", "8", "16", "--lr2", "1e-2", "1e-3", "--lam-per-lr2", "0", "0.1",
        "--consolidation", "ewc", "online", "--gamma", "1", "0.5",
        "--importance", "masq", "fisher", "--eval-val", "--init", "tf", "--masq-batch", "7",
        "--device", "cuda",
    )  # fmt: skip
    assert g.slt == ("D3-3-4", "D5-5") and g.seed == (3, 5)
    assert g.hidden == ((8,), (16,), (8, 8), (8, 16), (16, 8), (16, 16))
    assert g.lr2 == (1e-2, 1e-3) and g.lam == () and g.lam_per_lr2 == (0.0, 0.1)
    assert g.consolidation == ("ewc", "online-ewc") and g.gamma == (1.0, 0.5)
    assert g.importance == ("masq", "fisher") and g.masq_batch == (7,)
    assert g.eval_val == (True,) and g.init == ("tf",) and g.device == "cuda"
    assert g.iters1 == (5000,)  # not given: RunConfig's default
    assert _grid("--seed", "3", "5").seed == (3, 5)  # --seed-list is an alias of --seed
    assert _grid("--seeds", "3").seed == (0, 1, 2)
    assert _grid("--hidden", "800-400", "200").hidden == ((800, 400), (200,))
    assert _grid("--lam", "0", "10").lam == (0.0, 10.0)
    assert _grid("--lam", "5", "--lam-per-lr2", "1").lam == (5.0,)


def test_dry_run_of_a_three_task_grid(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(estimate_module, "measure", _fake_measure({(8,): 1.0, (16,): 2.0}))
    args = [
        "grid", "--preset", "none", "--slt", "D3-3-4", "--layers", "1", "--sizes", "8", "16",
        "--lr2", "1e-2", "--lam-per-lr2", "0", "0.1", "--consolidation", "ewc", "online-ewc",
        "--gamma", "1", "0.5", "--seeds", "2", "--dry-run", "--workers", "1", "--threads", "1",
    ]  # fmt: skip
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    # per architecture and seed: λ = 0 once, λ = 0.1 / 1e-2 = 10 with EWC and online EWC at
    # γ = 1 and 0.5: 4 runs; 2 x 2 x 4 = 16 runs, 2 x 2 x 2 x 2 x 2 = 32 combinations
    assert lines[0] == (
        "grid: 16 runs (2 seed × 2 hidden × 2 consolidation × 2 gamma × 2 λ; 32 combinations, "
        "merged where a setting cannot change the result, e.g. the importance at λ = 0)"
    )
    assert (
        lines[2]
        == "shared work: 4 task-1 trainings, 4 importance passes, 16 runs in 4 stacks of <= 16"
    )


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("masq: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown preset 'nope'" in _error(capsys, ["grid", "--preset", "nope", "--dry-run"])
    bad = tmp_path / "bad.toml"
    bad.write_text('slt = "D5-5"\nlr2 = [1e-3,,]\n', encoding="utf-8")
    err = _error(capsys, ["grid", "--grid", str(bad), "--dry-run"])
    assert "bad.toml" in err and "malformed TOML" in err and "line 2" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning_rate = [1e-3]\n", encoding="utf-8")
    err = _error(capsys, ["grid", "--grid", str(unknown), "--dry-run"])
    assert "unknown grid key 'learning_rate'" in err and "unknown.toml" in err
    empty = tmp_path / "empty.toml"
    empty.write_text("lr2 = []\n", encoding="utf-8")
    assert "axis 'lr2' is empty" in _error(capsys, ["grid", "--grid", str(empty), "--dry-run"])
    missing = str(tmp_path / "missing.toml")
    assert "cannot read" in _error(capsys, ["grid", "--grid", missing, "--dry-run"])
    future = tmp_path / "future"
    future.mkdir()
    (future / "meta.json").write_text('{"format": "masq-results", "version": 99}')
    err = _error(capsys, ["grid", *TINY, "--results", str(future), *FAST])
    assert "format version 99" in err
    assert "format version 99" in _error(capsys, ["table", "--results", str(future)])
    assert "give --results" in _error(capsys, ["grid", *TINY, *FAST])
    assert "--stack" in _error(capsys, ["grid", *TINY, "--stack", "0", "--dry-run"])
    assert "no results at" in _error(capsys, ["table", "--results", str(tmp_path / "nothing")])
    assert "unknown importance measure 'adam'" in _error(
        capsys, ["grid", *TINY, "--importance", "adam", "--dry-run"]
    )
    assert "must be between 0 and 1" in _error(
        capsys, ["grid", *TINY, "--slt", "D3-3-4", "--consolidation", "online-ewc", "--gamma",
                 "2", "--dry-run"]
    )  # fmt: skip
    assert "either --seeds" in _error(
        capsys, ["grid", *TINY, "--seeds", "2", "--seed-list", "3", "--dry-run"]
    )
    assert "either 'hidden' or 'layers'" in _error(
        capsys, ["grid", *TINY, "--layers", "2", "--dry-run"]
    )


def test_a_format_1_results_dir_is_refused_and_migrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    write_v1_dir(old)
    before = {p.name: p.read_bytes() for p in (old / "runs").glob("*.json")}
    for argv in (
        ["grid", *TINY, "--results", str(old), *FAST],
        ["grid", *TINY, "--results", str(old), "--dry-run"],
        ["table", "--results", str(old)],
    ):
        err = _error(capsys, argv)
        assert f"`masq migrate {old}`" in err and "format 1" in err
    assert {p.name: p.read_bytes() for p in (old / "runs").glob("*.json")} == before
    assert main(["migrate", str(old)]) == 0
    assert capsys.readouterr().out == f"{old}: 6 record(s) converted to format 2\n"
    assert json.loads((old / "meta.json").read_text())["version"] == 2
    assert main(["migrate", str(old)]) == 0
    assert capsys.readouterr().out == f"{old}: already format 2; nothing to do\n"
    assert main(["table", "--results", str(old), "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "| D5-5 |" in out and "Table 1" in out
    assert "no meta.json" in _error(capsys, ["migrate", str(tmp_path / "nothing")])


def test_a_systematic_failure_exits_1_with_the_traceback(
    tmp_path: Path,
    idx_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*a: Any, **kw: Any) -> list:
        raise RuntimeError("stacked kernel broke")

    monkeypatch.setattr(protocol, "continue_stacked", broken)
    res = tmp_path / "res"
    argv = ["grid", *TINY, "--results", str(res), "--data-dir", str(idx_dir), *FAST]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "Traceback (most recent call last)" in captured.err
    assert "in broken" in captured.err and "RuntimeError: stacked kernel broke" in captured.err
    assert (
        captured.err.rstrip()
        .splitlines()[-1]
        .startswith("masq grid: every run of the first group failed with the same error")
    )
    assert "done:" not in captured.out
    assert len(list((res / "d1").glob("*.safetensors"))) == 1  # stopped after the first group
    assert len(list((res / "errors").glob("*.json"))) == 4


def test_table_of_three_task_runs_has_transfer_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = learnable_dataset(300, 60, 120)  # curves that move: BWT and forgetting are not 0
    monkeypatch.setattr(masq.data, "load", lambda name="mnist", **kw: data)
    res = tmp_path / "res"
    argv = [
        "grid", "--preset", "none", "--slt", "D3-3-4", "--hidden", "16", "--iters1", "30",
        "--iters2", "20", "--eval-every", "5", "--batch-size", "20", "--masq-batch", "50",
        "--lr1", "1e-2", "--lr2", "1e-2", "--lam", "0", "10000", "--consolidation", "ewc",
        "online-ewc", "--gamma", "0.5", "--results", str(res), *FAST,
    ]  # fmt: skip
    assert main(argv) == 0
    assert "done: 3 runs now" in capsys.readouterr().out
    assert main(["table", "--results", str(res)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| SLT |"))
    assert "| D1∪D2∪D3 % |" not in header and "| all tasks % |" in header
    assert header.endswith("| ACC % | BWT % | forgetting % | seeds |")
    records = {
        p.stem: json.loads(p.read_text(encoding="utf-8"))["result"]
        for p in (res / "runs").glob("*.json")
    }
    assert len(records) == 3 and all(len(r["curves"]) == 3 for r in records.values())
    table = pd.read_csv(res / "table1_test.csv")
    assert list(table["criterion"]) == ["best", "last"]
    rows = [line for line in lines if line.startswith("| D3-3-4 |")]
    assert len(rows) == 2
    for (_, entry), line in zip(table.iterrows(), rows, strict=True):
        (rid,) = entry["run_ids"].split(",")
        curves = records[rid]["curves"]
        # by hand from the curves: R[i][j] = task j's last accuracy in phase i
        r = [[c[f"D{j}"][-1] for j in (1, 2, 3)] for c in curves]
        acc = sum(r[2]) / 3
        bwt = ((r[2][0] - r[0][0]) + (r[2][1] - r[1][1])) / 2
        forgetting = ((max(r[0][0], r[1][0]) - r[2][0]) + (max(r[0][1], r[1][1]) - r[2][1])) / 2
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-4:] == [f"{100 * acc:.2f}", f"{100 * bwt:.2f}",
                              f"{100 * forgetting:.2f}", "1"]  # fmt: skip
        final = [rec["curves"][2]["D1∪D2∪D3"] for rec in records.values()]
        if entry["criterion"] == "last":  # the winner has the highest final union accuracy
            assert cells[1] == "last" and f"{100 * max(f[-1] for f in final):.2f}" == cells[7]
        else:
            assert cells[1] == "best" and f"{100 * max(max(f[1:]) for f in final):.2f}" == cells[7]


# ----------------------------------------------------------------------------- reliability


def test_a_missing_gpu_is_refused_up_front_also_in_a_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = tmp_path / "res"
    for device in ("cuda", "cuda:1"):
        for extra in (["--dry-run"], ["--results", str(res), *FAST]):
            err = _error(capsys, ["grid", *TINY, "--device", device, *extra])
            assert err == (
                f"masq: error: device {device!r}: no CUDA GPU is visible here; use --device cpu "
                "or auto"
            )
            assert capsys.readouterr().out == ""  # before the counts
    assert not res.exists()


def _deny(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> None:
    """Make ``paths`` unwritable as chmod would for a user who is not root."""
    from masq import fileio

    real = fileio.probe_write
    denied = {p.resolve() for p in paths}

    def probe(directory: Path) -> None:
        if Path(directory).resolve() in denied:
            raise PermissionError(13, "Permission denied", str(directory))
        real(directory)

    monkeypatch.setattr(fileio, "probe_write", probe)


def test_every_output_location_is_checked_before_any_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_store import _result

    def no_work(*a: Any, **kw: Any) -> Any:
        raise AssertionError("work started before the output locations were checked")

    for name in ("run", "compare", "continue_stacked", "continue_run", "train_first"):
        monkeypatch.setattr(protocol, name, no_work)
    file = tmp_path / "file"
    file.write_text("x")
    under = file / "sub"
    ro = tmp_path / "ro"
    ro.mkdir()
    res = tmp_path / "res"
    Store(res).write_result(_result(RunConfig(hidden=(8,))))
    _deny(monkeypatch, ro, res)
    cases = {
        ("grid", *TINY, "--results", str(under), *FAST):
            f"--results {str(under)!r} is under the regular file {str(file)!r}",
        ("grid", *TINY, "--results", str(ro), *FAST): f"--results {str(ro)!r} is not writable",
        ("grid", *TINY, "--results", str(file), *FAST): f"--results {str(file)!r} is an existing",
        ("table", "--results", str(res)):
            f"--results (--out) {str(res)!r} is not writable (Permission denied)",
        ("table", "--results", str(res), "--out", str(file)): f"--out {str(file)!r} is an existing",
        ("table", "--results", str(res), "--out", str(ro)): f"--out {str(ro)!r} is not writable",
        ("consistency", "--results", str(res), "--out", str(under)): f"--out {str(under)!r} is",
        ("consistency", "--results", str(res), "--out", str(tmp_path / "figs"), *FAST):
            f"--results {str(res)!r} is not writable",
        ("run", "--out", str(ro)): f"--out {str(ro)!r} is not writable (Permission denied)",
        ("run", "--out", str(under)): f"--out {str(under)!r} is under the regular file",
        ("compare", "--out", str(ro)): f"--out {str(ro)!r} is not writable",
        ("run", "--out", str(tmp_path / "o"), "--tensorboard", str(under)):
            f"--tensorboard {str(under)!r} is under the regular file {str(file)!r}",
        ("run", "--out", str(tmp_path / "o"), "--tensorboard", str(ro)):
            f"--tensorboard {str(ro)!r} is not writable",
    }  # fmt: skip
    for argv, expected in cases.items():
        err = _error(capsys, list(argv))
        assert err.startswith(f"masq: error: {expected}"), (argv, err)
        assert capsys.readouterr().out == ""
    assert [p.name for p in ro.iterdir()] == [] and not (res / "table1_test.md").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directories_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = _error(capsys, ["grid", *TINY, "--results", str(ro / "res"), *FAST])
        assert "is not writable (Permission denied)" in err
        assert "is not writable" in _error(capsys, ["run", "--out", str(ro)])
    finally:
        ro.chmod(0o755)


def test_table_and_consistency_refuse_an_invalid_record_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_store import _result

    res = tmp_path / "res"
    rid = Store(res).write_result(_result(RunConfig(hidden=(8,))))
    path = res / "runs" / f"{rid}.json"
    text = path.read_bytes()
    for content in (text[:50], b"{}", b"\xff\xfe" + bytes(range(200))):
        path.write_bytes(content)
        for argv in (["table", "--results", str(res)], ["consistency", "--results", str(res)]):
            err = _error(capsys, argv)
            assert err.startswith(f"masq: error: {path}: not a valid run record (")


@pytest.mark.slow
def test_a_result_whose_write_fails_is_rescued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from masq.fileio import rescue_dir
    from masq.protocol import Result

    monkeypatch.setattr(
        masq.data, "load", lambda name="mnist", **kw: learnable_dataset(300, 60, 60)
    )
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    small = ["--hidden", "8", "--iters", "10", "--eval-every", "5", "--masq-batch", "50",
             "--batch-size", "20", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(["run", *small, "--out", str(tmp_path / "ok")]) == 0
    (reference,) = (tmp_path / "ok").glob("*.json")
    capsys.readouterr()

    def full_disk(self: Result, path: Any) -> Path:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Result, "save", full_disk)
    out = tmp_path / "full"
    assert main(["run", *small, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the plan and phase lines
    where = rescue_dir(out)
    assert err == (
        f"masq: could not write into {out} (No space left on device at {out / reference.name}); "
        f"the finished result was saved to {where} instead"
    )
    saved = json.loads((where / reference.name).read_text(encoding="utf-8"))
    expected = json.loads(reference.read_text(encoding="utf-8"))
    for key in ("config", "curves", "best", "last", "accuracy", "metrics"):
        assert saved[key] == expected[key]  # the same run, nothing lost
    assert main(["compare", *small, "--out", str(tmp_path / "cmp")]) == 1
    names = sorted(p.name for p in rescue_dir(tmp_path / "cmp").iterdir())
    assert names == ["fisher.json", "masq-mean.json", "masq-sum.json", "none.json"]


def test_sigterm_is_handled_like_ctrl_c(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal
    import time

    from masq.cli import grid_cmd

    def terminated(args: Any) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(grid_cmd, "run_migrate", terminated)
    assert main(["migrate", "x"]) == 143
    assert capsys.readouterr().err == (
        "masq: terminated (SIGTERM); nothing half-written was kept (re-run to resume).\n"
    )
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lives only inside main


def test_an_unforeseen_os_error_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from masq.cli import grid_cmd

    def full(args: Any) -> int:
        raise OSError(28, "No space left on device", "/some/file")

    monkeypatch.setattr(grid_cmd, "run_migrate", full)
    assert main(["migrate", "x"]) == 1
    assert capsys.readouterr().err == "masq: error: No space left on device (/some/file)\n"
