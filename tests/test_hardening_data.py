"""Issue 27, "nothing lost, nothing silently wrong": one test (or a few) per case, each failing
on the code before its fix.

CLI cases run the real ``masq`` in a child process (``python -c`` calling
:func:`masq.cli.main`, with ``masq.data.load`` pointed at a tiny synthetic dataset where the
command trains) and assert the exit code, a one-line message on stderr (no traceback) and that
no result was lost.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from masq import analysis, grid, importance, protocol
from masq import data as masq_data
from masq import tasks as masq_tasks
from masq.analysis.common import read_manifest
from masq.config import RunConfig
from masq.consolidation import imm
from masq.errors import ConfigError
from masq.importance import kfac
from masq.models import mlp
from masq.protocol import stream_seed
from masq.protocol.result import Result, build_result
from masq.report import table1, to_markdown
from masq.report.runs import cell, run_stem
from masq.runid import run_id
from masq.store import Store, load
from tests.synthetic import learnable_dataset, synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]

# a child process running `masq ARGV` on a tiny learnable dataset (no disk, no network)
CHILD = """
import sys
sys.path.insert(0, {root!r})
import masq.data
from tests.synthetic import learnable_dataset
_data = learnable_dataset(n_train=300, n_val=50, n_test=100)
masq.data.load = lambda *args, **kwargs: _data
{setup}
from masq.cli import main
sys.exit(main({argv!r}))
"""
# `masq run` of two tiny tasks: seconds
RUN = ["--slt", "D5-5", "--hidden", "8", "--iters", "10", "--eval-every", "5",
       "--batch-size", "20", "--masq-batch", "50", "--threads", "1", "--quiet"]  # fmt: skip


def masq(
    *argv: object,
    cwd: Path,
    setup: str = "",
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``masq ARGV`` in a child process (module docstring), its output captured."""
    script = CHILD.format(root=str(ROOT), setup=setup, argv=[str(a) for a in argv])
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The one line a failed command printed on stderr (no traceback), its status checked."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def learnable(monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = learnable_dataset(n_train=300, n_val=50, n_test=100)
    monkeypatch.setattr(masq_data, "load", lambda *args, **kwargs: dataset)


TINY = RunConfig(hidden=(8,), iters1=20, iters2=10, batch_size=25, masq_batch=50, eval_every=10,
                 lr2=1e-3, lam=10.0)  # fmt: skip


# ------------------------------------------------------- 1. a second run never replaces the first


@pytest.mark.parametrize(
    "change",
    [{"init": "tf"}, {"iters1": 11}, {"iters2": 11}, {"precision": "bf16"},
     {"consolidation": "mode-imm"}, {"batch_size": 50}, {"eval_every": 7}, {"lr1": 0.01}],
    ids=lambda c: next(iter(c)),
)  # fmt: skip
def test_the_record_name_holds_everything_that_changes_the_numbers(change: dict) -> None:
    base = RunConfig(hidden=(8,)).validate()
    assert run_stem(base) == run_stem(RunConfig(hidden=(8,)))  # a re-run: its own file
    assert run_stem(base) == f"D5-5_8_masq-mean_lr2-1e-05_lam-1000_seed0_{run_id(base)}"
    assert run_stem(base.with_(**change)) != run_stem(base)


def test_a_second_run_into_one_out_dir_keeps_the_first_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = masq("run", *RUN, "--out", out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = masq("run", *RUN, "--init", "tf", "--out", out, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    records = sorted(out.glob("*.json"))
    assert len(records) == 2  # before: one file, the first run's record replaced
    configs = [Result.load(p).config for p in records]
    assert sorted(c.init.value for c in configs) == ["tf", "torch"]
    for path, config in zip(records, configs, strict=True):
        assert path.stem == run_stem(config) and (out / f"{path.stem}.png").exists()


# ------------------------------------------------ 2. empty batches; importance.batches re-iterable


MEASURES: dict[str, Callable[..., Any]] = {
    "fisher": lambda m, b: importance.fisher(m, b),
    "fisher-exact": lambda m, b: importance.fisher(m, b, labels="exact"),
    "fisher-batched": lambda m, b: importance.fisher(m, b, labels="batched"),
    "masq": lambda m, b: importance.masq(m, b),
    "masq-sum": lambda m, b: importance.masq(m, b, scale="sum"),
    "mas": lambda m, b: importance.mas(m, b),
    "kfac": lambda m, b: kfac.kfac_factors(m, b),
    "fisher-blocks": lambda m, b: kfac.layer_fisher_factors(m, b),
}


def _model_and_data(n: int = 20) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 784, generator=g)
    return mlp((8,), seed=0), x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", MEASURES)
def test_every_measure_refuses_an_empty_batch(name: str) -> None:
    model, x, y = _model_and_data()
    with pytest.raises(ConfigError) as info:
        MEASURES[name](model, [(x, y), (x[:0], y[:0])])  # before: MaSQ halved, others silent
    message = str(info.value)
    assert message.startswith("batches: batch 1 is empty") and "\n" not in message


def test_batches_can_be_iterated_again_as_the_readme_does() -> None:
    model, x, y = _model_and_data()
    data = importance.batches(x, y, batch_size=8)
    assert len(data) == 3
    assert [len(b) for b, _ in data] == [8, 8, 4] == [len(b) for b, _ in data]
    fim = importance.fisher(model, data)  # the README: the FIM, then MaSQ on one `data`
    masq_ = importance.masq(model, data)  # before: an exhausted generator ("yielded nothing")
    fresh_fim = importance.fisher(model, importance.batches(x, y, 8))
    fresh_masq = importance.masq(model, importance.batches(x, y, 8))
    for name in fim:
        assert torch.equal(fim[name], fresh_fim[name])
        assert torch.equal(masq_[name], fresh_masq[name])


# ---------------------------------------------------------- 3. sizes refused before allocating


def test_an_alpha_sweep_too_fine_is_refused_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"alpha_step: 1e-09 gives a sweep of 1,000,000,00"):
        imm.shares(1e-9)  # before: a list of a billion shares (killed for memory)
    assert time.monotonic() - start < 1.0
    assert len(imm.shares(1e-4)) == imm.MAX_ALPHA_POINTS  # the limit itself is allowed


def test_masq_imm_refuses_a_too_fine_alpha_step_before_training(tmp_path: Path) -> None:
    out = tmp_path / "imm"
    proc = masq("imm", *RUN, "--alpha-step", "1e-9", "--out", out, cwd=tmp_path, timeout=120)
    line = one_line_error(proc)
    assert "--alpha-step" in line and "1,000,000,001 merges" in line
    assert not out.exists()  # nothing trained, nothing written


def test_a_lambda_sweep_of_too_many_points_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--per-decade 100000 .* gives 1,200,001 λ values"):
        analysis.lam_grid(1.0, 1e12, 100_000)  # before: 1.2 million λ, then 3.6 million runs
    with pytest.raises(ConfigError, match=r"^--lam-max must be a finite number, got inf"):
        analysis.lam_grid(1.0, math.inf, 2)  # before: blamed --lam-min


def test_masq_analyze_lambda_refuses_a_huge_per_decade(tmp_path: Path) -> None:
    argv = ["analyze", "lambda", "--slt", "D5-5", "--per-decade", "1000000", "--dry-run"]
    line = one_line_error(masq(*argv, cwd=tmp_path, timeout=120))
    assert "--per-decade 1000000" in line and "12,000,001 λ values" in line


def test_a_grid_over_the_size_limit_is_refused_before_it_is_expanded() -> None:
    values = {"seeds": 1000, "lr2": [1e-5 * (k + 1) for k in range(100)], "lam": list(range(100))}
    with pytest.raises(ConfigError, match=r"grid: 10,000,000 combinations \(1,000 seed"):
        grid.grid_from_mapping(values)  # before: accepted; expanding it takes hours
    with pytest.raises(ConfigError, match=r"'seeds' \(--seeds\) 1,000,000,000 is above"):
        grid.grid_from_mapping({"seeds": 10**9})  # before: a tuple of a billion seeds
    with pytest.raises(ConfigError, match=r"--layers 40 with 2 --sizes gives more than"):
        grid.grid_from_mapping({"layers": [40], "sizes": [8, 16]})  # 2^40 architectures


def test_masq_grid_dry_run_refuses_a_grid_over_the_limit(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    axes = {
        "seed": map(str, range(1000)),
        "lr2": (f"{1e-5 * (k + 1):g}" for k in range(100)),
        "lam": map(str, range(100)),
    }
    toml.write_text("".join(f"{k} = [{', '.join(v)}]\n" for k, v in axes.items()), "utf-8")
    proc = masq("grid", "--preset", "none", "--grid", toml, "--dry-run", cwd=tmp_path)
    line = one_line_error(proc)  # before: a dry run expanding ten million configs
    assert "10,000,000 combinations" in line and "limit of 1,000,000" in line


@pytest.mark.parametrize("command", ["run", "grid"])
def test_an_absurd_hidden_width_is_one_line(tmp_path: Path, command: str) -> None:
    hidden = ["--hidden", "99999999999999"]
    if command == "run":
        argv = ["run", *RUN, *hidden, "--out", tmp_path / "out"]
    else:
        argv = ["grid", "--preset", "none", *hidden, "--lam", "0", "--dry-run"]
    line = one_line_error(masq(*argv, cwd=tmp_path, timeout=120))  # before: a torch traceback
    assert "MLP 784-99999999999999-10 has 7.95e+16 parameters" in line and "--hidden" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 4. an unreachable Ray address


def test_an_unreachable_ray_address_is_one_line_within_the_timeout(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    argv = ["grid", "--preset", "none", "--slt", "D5-5", "--hidden", "8", "--iters1", "10",
            "--iters2", "10", "--lam", "0", "--results", tmp_path / "res", "--no-progress",
            "--executor", "ray", "--address", "127.0.0.1:1", "--ray-timeout", "1"]  # fmt: skip
    start = time.monotonic()
    line = one_line_error(masq(*argv, cwd=tmp_path, timeout=200))  # before: > 400 s, a hang
    assert time.monotonic() - start < 100
    assert line.startswith("masq: error: --address 127.0.0.1:1: cannot reach a Ray cluster")
    assert "within 1 s" in line and "--ray-timeout" in line


def test_a_ray_head_that_never_answers_is_given_up_after_the_timeout() -> None:
    from masq.grid.connect import connect_ray  # before: no such module (ray.init waited on)

    class SilentRay:  # ray.init against a port that accepts but never speaks Ray
        def init(self, **kwargs: Any) -> None:
            time.sleep(20)

    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"did not answer within 0.5 s.*--ray-timeout"):
            connect_ray(SilentRay(), address, 0.5)
        assert time.monotonic() - start < 5
    with pytest.raises(ConfigError, match=r"give auto or the cluster's HOST:PORT"):
        connect_ray(SilentRay(), "no-port-here", 0.5)


# ---------------------------------------------------------------- 5. a worker killed with kill -9


def tasks_or_die(config: RunConfig) -> list[masq_tasks.Task]:
    """The tasks of ``config`` on a tiny synthetic dataset; with MASQ_TEST_KILL set, the worker
    process that builds the tasks of the 6-4 net kills itself (SIGKILL) instead."""
    if os.environ.get("MASQ_TEST_KILL") and config.hidden == (6, 4):
        os.kill(os.getpid(), signal.SIGKILL)
    data = synthetic_dataset(300, 60, 100)
    return masq_tasks.make(config.slt, dataset=data, seed=stream_seed(config.seed, "tasks"))


def test_a_worker_killed_with_kill_9_stops_the_grid_cleanly(tmp_path: Path) -> None:
    results = tmp_path / "res"
    setup = ("import masq.cli.grid_cmd as grid_cmd\n"
             "from tests.test_hardening_data import tasks_or_die\n"
             "grid_cmd.tasks_fn = lambda data_dir: tasks_or_die")  # fmt: skip
    argv = ["grid", "--preset", "none", "--slt", "D5-5", "--hidden", "8", "6-4", "--iters1", "10",
            "--iters2", "10", "--eval-every", "5", "--batch-size", "20", "--masq-batch", "50",
            "--lam", "0", "10", "--results", results, "--workers", "2", "--threads", "1",
            "--no-progress"]  # fmt: skip
    killed = masq(*argv, cwd=tmp_path, setup=setup, env={"MASQ_TEST_KILL": "1"})
    line = one_line_error(killed)  # before: a screen of BrokenProcessPool tracebacks
    assert line.startswith("masq: error: a grid worker process died (killed by SIGKILL")
    assert "re-run the same command" in line and str(results / "errors") in line
    stored = {p.stem for p in (results / "runs").glob("*.json")}
    failed = {p.stem for p in (results / "errors").glob("*.json")}
    assert failed and not failed & stored
    for path in (results / "errors").glob("*.json"):
        assert "WorkerDied" in json.loads(path.read_text(encoding="utf-8"))["error"]

    again = masq(*argv, cwd=tmp_path, setup=setup)  # the next start redoes the lost runs
    assert again.returncode == 0, again.stderr
    total = len({p.stem for p in (results / "runs").glob("*.json")})
    assert total == 4 and stored <= {p.stem for p in (results / "runs").glob("*.json")}
    assert f"done: {total - len(stored)} runs now, {len(stored)} were stored, 0 failed" in (
        again.stdout
    )


# --------------------------------------------------------------------- 6. a diverged run says so


def test_a_diverged_run_says_so_once_with_phase_and_iteration(
    learnable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    result = protocol.run(TINY.with_(lr1=1e30))  # diverges in phase 1: once, not per phase
    err = capsys.readouterr().err.strip().splitlines()
    assert result.meta["diverged"] == "phase 1"
    assert len(err) == 1 and err[0].startswith("masq: warning: train D1: the loss is nan")
    assert "at iteration 10 of 20" in err[0]
    result = protocol.run(TINY.with_(lr2=1e30))
    err = capsys.readouterr().err.strip().splitlines()
    assert result.meta["diverged"] == "phase 2"
    assert len(err) == 1 and err[0].startswith("masq: warning: train D2 (EWC+MaSQ (mean)): ")
    protocol.run(TINY)
    assert capsys.readouterr().err == ""  # a healthy run says nothing


def test_a_stacked_diverged_run_says_so_once(
    learnable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = protocol.make_tasks(TINY)
    d1 = protocol.train_first(TINY, tasks)
    imp, seconds = protocol.compute_importance(TINY, d1, tasks)
    configs = [TINY.with_(lr2=1e30), TINY, TINY.with_(lam=3.0, lr2=1e30)]
    capsys.readouterr()
    results = protocol.continue_stacked(configs, d1, [imp] * 3, tasks, [seconds] * 3)
    assert [r.meta.get("diverged") for r in results] == ["phase 2", None, "phase 2"]
    err = capsys.readouterr().err.strip().splitlines()  # before: nothing
    assert len(err) == 2 and all(e.startswith("masq: warning: D") for e in err), err
    assert "lr2 1e+30, seed 0" in err[0] and "λ 3, lr2 1e+30" in err[1]
    assert "not finite at the end of phase 2" in err[0]


def test_masq_run_of_a_diverging_run_prints_one_warning(tmp_path: Path) -> None:
    proc = masq("run", *RUN, "--lr1", "1e30", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [x for x in proc.stderr.splitlines() if "diverged" in x]  # before: nothing at all
    assert len(said) == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = said
    assert line.startswith("masq: warning: train D1: the loss is nan at iteration 5 of 10")
    (record,) = (tmp_path / "out").glob("*.json")
    assert Result.load(record).meta["diverged"] == "phase 1"


# ------------------------------------------------------------------ 7. a malformed manifest


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "a JSON list, not an object"),
        ('{"analysis": "lambda"}', '"format" is None'),
        ('{"format": "masq-analysis", "analysis": "compare"}', "\"analysis\" is 'compare'"),
        ('{"format": "masq-analysis", "analysis": "lambda", "files": []}', '"files" is a JSON'),
        ('{"format": "masq-analysis", "analysis": "lambda", "files": {"csv": 3}}', '"csv" is 3'),
    ],
)
def test_a_malformed_manifest_is_an_error_naming_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "lambda.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_manifest(path)  # before: None, i.e. "missing"
    message = str(info.value)
    assert message.startswith(f"{path}: malformed analysis manifest (") and problem in message
    assert read_manifest(tmp_path / "absent.json") is None


def test_masq_report_names_a_malformed_lambda_manifest(tmp_path: Path) -> None:
    results = tmp_path / "sweep"
    results.mkdir()
    (results / "lambda.json").write_text('{"analysis": "lambda", "files": {}}', encoding="utf-8")
    proc = masq("report", "--results", results, "--out", tmp_path / "report", cwd=tmp_path)
    line = one_line_error(proc)  # before: "holds neither stored runs nor analysis outputs"
    assert line.startswith(f"masq: error: {results / 'lambda.json'}: malformed analysis manifest")
    assert (results / "lambda.json").exists()


# ------------------------------------------------------------- 8. NaN and diverged in tables

U = "D1∪D2"


def _store_run(
    store: Store, config: RunConfig, best: float, last: float, diverged: str = ""
) -> None:
    curves = [
        {"iteration": [0, 10], "D1": [0.1, 0.9], "D2": [0.0, 0.0], U: [0.05, 0.45]},
        {"iteration": [0, 10, 20], "D1": [0.5, best, last], "D2": [0.0, best, last],
         U: [0.3, best, last]},
    ]  # fmt: skip
    result = build_result(config, curves, importance=None, train_seconds=[1.0, 2.0],
                          importance_seconds=[0.5], meta={}, diverged=diverged or None)  # fmt: skip
    store.write_result(result)


def _spoiled_store(root: Path) -> Store:
    """A (200-200): seed 0 healthy (0.8 / 0.7), seed 1 diverged at chance, seed 2 with NaN
    accuracies; B (800-800): every seed diverged with high numbers that must never win."""
    store = Store(root)
    a = RunConfig(hidden=(200, 200), lr2=1e-3, lam=100.0).validate()
    _store_run(store, a, 0.8, 0.7)
    _store_run(store, a.with_(seed=1), 0.1, 0.1, diverged="phase 2")
    _store_run(store, a.with_(seed=2), math.nan, math.nan)
    b = a.with_(hidden=(800, 800))
    for seed in range(2):
        _store_run(store, b.with_(seed=seed), 0.95, 0.95, diverged="phase 2")
    return store


def test_table1_never_averages_diverged_or_nan_runs_in(tmp_path: Path) -> None:
    _spoiled_store(tmp_path)
    table = table1(load(tmp_path)).set_index("criterion")
    best = table.loc["best"]
    assert best["hidden"] == "200-200"  # before: 800-800, its diverged 0.95 averaged in
    assert best["acc_mean"] == pytest.approx(0.8) and best["seeds"] == 3  # before: 0.45
    assert best["diverged"] == 2 and best["method"].endswith("[diverged in 2 of 3]")
    assert table.loc["last", "acc_mean"] == pytest.approx(0.7)
    text = to_markdown(table1(load(tmp_path)))
    assert "nan" not in text.lower()
    only_b = load(tmp_path)
    only_b = table1(only_b[only_b["hidden"] == "800-800"])
    row = next(r for r in to_markdown(only_b).splitlines() if r.startswith("| D5-5 | best"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7:11] == ["diverged", "diverged", "diverged", "—"]  # D1∪D2, D1, D2, iteration


def test_the_lambda_sweep_frame_counts_diverged_runs_apart(tmp_path: Path) -> None:
    base = {"slt": "D5-5", "hidden": "8", "lr2": 1e-3, "masq_batch": 1000, "scale": "mean",
            "consolidation": "ewc", "fisher_labels": "true", "importance": "fisher"}  # fmt: skip
    rows = [
        {**base, "lam": 10.0, "seed": 0, "best.union": 0.8, "last.union": 0.7, "diverged": ""},
        {**base, "lam": 10.0, "seed": 1, "best.union": 0.1, "last.union": 0.1,
         "diverged": "phase 2"},
        {**base, "lam": 10.0, "seed": 2, "best.union": math.nan, "last.union": math.nan,
         "diverged": ""},
        {**base, "lam": 1e6, "seed": 0, "best.union": 0.99, "last.union": 0.99,
         "diverged": "phase 2"},
    ]  # fmt: skip
    frame = analysis.sweep_frame(pd.DataFrame(rows)).set_index("lam")
    assert frame.loc[10.0, "best_mean"] == pytest.approx(0.8)  # before: 0.45
    assert (frame.loc[10.0, "seeds"], frame.loc[10.0, "diverged"]) == (3, 2)
    assert math.isnan(frame.loc[1e6, "best_mean"])  # before: 0.99, the "best λ"
    needed = analysis.needed_lambda(frame.reset_index()).set_index("criterion")
    assert needed.loc["best", "lam_best"] == 10.0
    md = analysis.sweep.sweep_markdown(frame.reset_index())
    assert "| diverged |" in md and "nan" not in md.lower()


def test_a_nan_accuracy_in_a_run_table_reads_diverged() -> None:
    assert cell("last D1∪D2", math.nan) == "diverged"  # before: "nan"
    assert cell("last D1∪D2", 0.5) == "0.5000" and cell("re-train s", 1.0) == "1.00"
