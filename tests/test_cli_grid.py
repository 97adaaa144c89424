"""The ``masq grid`` / ``masq table`` / ``masq consistency`` commands, end to end (tiny)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from masq.cli import main

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


def test_grid_table_consistency_end_to_end(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = str(tmp_path / "res")
    args = ["grid", *TINY, "--results", res, "--data-dir", str(idx_dir), *FAST, "--stack", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "grid: 8 runs" in out and "done: 8 runs now, 0 were stored, 0 failed" in out
    assert "2 D1 trainings and 2 importance passes" in out
    assert main(args) == 0  # resumed: nothing to do
    assert "done: 0 runs now, 8 were stored" in capsys.readouterr().out

    assert main(["table", "--results", res]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "| D5-5 |" in out and "selected on the TEST curves" in out
    assert (Path(res) / "table1_test.md").exists() and (Path(res) / "table1_test.csv").exists()

    out_dir = tmp_path / "figs"
    cons = ["consistency", "--results", res, "--data-dir", str(idx_dir), "--out", str(out_dir)]
    assert main([*cons, *FAST]) == 0
    out = capsys.readouterr().out
    assert "EWC+FIM" in out and "no EWC" in out and "EWC+MaSQ" in out
    assert (out_dir / "consistency_D5-5.png").stat().st_size > 1000


def test_dry_run_prints_counts_and_an_estimate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid_file = tmp_path / "g.toml"
    grid_file.write_text('importance = ["masq", "fisher"]\nseeds = 2\n', encoding="utf-8")
    args = ["grid", *TINY, "--grid", str(grid_file), "--dry-run", "--workers", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # 2 seeds x 2 archs x 2 lr2 x (λ = 0 once + λ = 10 for masq and fisher)
    assert "grid: 24 runs" in out and "32 before merging" in out
    assert "4 D1 trainings, 8 importance passes, 24 D2 runs" in out
    assert "estimated time with 2 worker(s)" in out


def test_paper_preset_dry_run_counts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from masq import search

    monkeypatch.setattr(
        search,
        "estimate",
        lambda *a, **k: search.Estimate(3600.0, 60.0, 6.0, 3534.0, 300.0, 2, 1, ((200, 200),), 36),
    )
    assert main(["grid", "--preset", "paper", "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "grid: 1728 runs (3 slt × 36 hidden × 4 lr2 × 4 λ" in out
    assert "108 D1 trainings, 108 importance passes, 1728 D2 runs in 108 stacks" in out
    assert "1.0 h" not in out and "60.0 min" in out


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
    (future / "meta.json").write_text('{"format": "masq-results", "version": 2}')
    err = _error(capsys, ["grid", *TINY, "--results", str(future), *FAST])
    assert "format version 2" in err
    assert "format version 2" in _error(capsys, ["table", "--results", str(future)])
    assert "give --results" in _error(capsys, ["grid", *TINY, *FAST])
    assert "--stack" in _error(capsys, ["grid", *TINY, "--stack", "0", "--dry-run"])
    assert "no results at" in _error(capsys, ["table", "--results", str(tmp_path / "nothing")])
    assert "unknown value 'adam'" in _error(
        capsys, ["grid", *TINY, "--importance", "adam", "--dry-run"]
    )
    assert "either --seeds" in _error(
        capsys, ["grid", *TINY, "--seeds", "2", "--seed-list", "3", "--dry-run"]
    )
