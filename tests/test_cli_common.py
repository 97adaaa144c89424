"""What the commands share (masq.cli.common, the flag blocks of masq.cli.options) and the
single-run tables of masq.report.runs."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from masq.cli import build_parser, main
from masq.cli.common import at_least_one, done_text, print_failed, resolve_workers, stored_ids
from masq.errors import ConfigError
from masq.report.runs import cell, csv_text, markdown_table, safe_name, text_table
from masq.runtime import cpu_count
from masq.store import Store

estimate_module = importlib.import_module("masq.grid.estimate")


def _flags(command: str) -> set[str]:
    """Every option string of ``masq COMMAND``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in sub.choices[command]._actions for s in a.option_strings}


def test_at_least_one_names_the_first_bad_flag() -> None:
    at_least_one(("--stack", 1), ("--seeds", 3))
    with pytest.raises(ConfigError, match=r"^--seeds must be >= 1, got 0$"):
        at_least_one(("--stack", 2), ("--seeds", 0), ("--workers", -1))


def test_workers_and_threads_default_to_the_cores() -> None:
    assert resolve_workers(None, None) == (cpu_count(), 1)
    assert resolve_workers(1, None) == (1, cpu_count())
    assert resolve_workers(2, 3) == (2, 3)
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        resolve_workers(0, None)


def test_stored_ids_of_a_dry_run_write_nothing(tmp_path: Path) -> None:
    assert stored_ids(None) == set()
    assert stored_ids(tmp_path / "absent") == set() and not (tmp_path / "absent").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert stored_ids(empty) == set() and list(empty.iterdir()) == []
    root = tmp_path / "store"
    Store(root).check_writable()
    (root / "runs" / "broken.json").write_text("{", encoding="utf-8")
    assert stored_ids(root) == set()
    assert (root / "runs" / "broken.json").exists()  # not set aside by a dry look
    foreign = tmp_path / "foreign"
    (foreign / "runs").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no meta\.json"):
        stored_ids(foreign)


def test_a_dry_run_into_an_existing_directory_leaves_it_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(estimate_module, "measure", lambda *a, **kw: dict.fromkeys(
        ("d1_iter", "d2_iter", "d2_iter_one", "eval_sample_one", "eval_sample_stack",
         "importance_sample"), 1e-4))  # fmt: skip
    res = tmp_path / "lam"
    res.mkdir()
    args = ["analyze", "lambda", "--slt", "D5-5", "--results", str(res), "--dry-run",
            "--workers", "1", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    assert "stored already: 0; to run: 76" in capsys.readouterr().out
    assert list(res.iterdir()) == []  # no meta.json written by a dry run


def test_consistency_checks_stack_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_settle import confirmed_store

    root = tmp_path / "r"
    confirmed_store(root)
    assert main(["consistency", "--results", str(root), "--stack", "0"]) == 2
    assert capsys.readouterr().err.strip() == "masq: error: --stack must be >= 1, got 0"
    assert not (root / "figures").exists()  # refused before anything was written


def test_failed_runs_and_the_done_line(capsys: pytest.CaptureFixture[str]) -> None:
    failed = {f"id{i:02d}": f"boom {i}" for i in range(12)}
    print_failed(failed, "res")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"failed runs (details in {Path('res') / 'errors'}):"
    assert err[1:3] == ["  id00: boom 0", "  id01: boom 1"]
    assert err[-1] == "  ... and 2 more" and len(err) == 12
    summary = SimpleNamespace(done=3, skipped=5, failed={"x": "y"})
    assert done_text(summary) == "done: 3 runs now, 5 were stored, 1 failed"


def test_one_block_of_flags_per_kind_of_command() -> None:
    single = {"--iters", "--out", "--threads", "--data-dir", "--quiet"}
    for command in ("run", "compare", "imm"):
        assert single <= _flags(command)
    assert {"--csv", "--tensorboard"} <= _flags("run") & _flags("compare")
    assert not {"--csv", "--tensorboard"} & _flags("imm")
    execution = {"--workers", "--threads", "--stack", "--data-dir", "--no-progress"}
    for command in ("grid", "consistency", "table1"):
        assert execution <= _flags(command)
    assert {"--executor", "--address"} <= _flags("grid") & _flags("consistency")
    assert not {"--executor", "--address"} & _flags("table1")


def test_the_single_run_tables() -> None:
    rows = [
        {"method": "EWC+FIM", "best D1∪D2": 0.91234, "best at it": 250, "importance s": 1.5},
        {"method": "no EWC", "best D1∪D2": 0.5, "best at it": 5000, "importance s": 0.0},
    ]
    assert cell("importance s", 1.5) == "1.50" and cell("x", 0.5) == "0.5000"
    assert cell("x", 12.34) == "12.3" and cell("x", 7) == "7"
    assert text_table(rows).splitlines() == [
        "method   best D1∪D2  best at it  importance s",
        "EWC+FIM      0.9123         250          1.50",
        "no EWC       0.5000        5000          0.00",
    ]
    assert markdown_table(rows).splitlines()[1:] == [
        "| --- | --- | --- | --- |",
        "| EWC+FIM | 0.9123 | 250 | 1.50 |",
        "| no EWC | 0.5000 | 5000 | 0.00 |",
    ]
    assert csv_text(rows).splitlines()[1] == "EWC+FIM,0.91234,250,1.5"
    assert safe_name("D5-5:3,7/x y") == "D5-5_3_7_x_y"


def test_a_command_sets_the_wait_policy_before_torch_loads() -> None:
    """masq.cli.main sets OMP_WAIT_POLICY (on a busy machine) before the commands load torch."""
    import subprocess
    import sys

    code = """
import os, sys
import masq.cli, masq.cli.waitpolicy as wp
wp.oversubscribed = lambda: True
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
assert "torch" not in sys.modules
masq.cli.main(["run", "--lr2", "-1"])  # loads torch (the registries), then refuses the value
sys.exit(seen != ["PASSIVE"])
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()


@pytest.mark.parametrize("command", ["run", "grid"])
def test_a_boolean_field_is_given_either_way_or_not_at_all(command: str) -> None:
    """``--train-on-val`` gives True, ``--no-train-on-val`` False (which overrides a preset's
    true), and neither leaves the field to the preset or the default."""
    from masq.cli.options import given

    def parsed(*flags: str) -> dict[str, object]:
        return given(build_parser().parse_args([command, *flags]))

    assert parsed("--train-on-val", "--no-permute-first") == {
        "train_on_val": True,
        "permute_first": False,
    }
    assert parsed("--no-eval-val")["eval_val"] is False
    assert "train_on_val" not in parsed() and "eval_val" not in parsed()
