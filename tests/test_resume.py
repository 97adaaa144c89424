"""Phase checkpoints (masq.protocol.resume): runs stopped after phase t and started again give
the records of runs that never stopped (the timings aside): the stacked engine, the one-by-one
loop (Adam kept across phases), runs trained alike (IMM), SI alone, and a grid stopped in a
stack; plus the file's own rules (throttle, other runs' files, unreadable files, full disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from masq import protocol
from masq.config import RunConfig
from masq.grid import execute, group
from masq.protocol import resume
from masq.protocol.resume import PhaseCheckpoint, checkpoint_key, phase_checkpoint
from masq.runid import run_id
from masq.store import Store

FOUR = {"slt": "D2-2-2-4", "hidden": (16,), "iters1": 30, "iters2": 20, "batch_size": 20,
        "eval_every": 10, "lr1": 1e-3, "lr2": 1e-3, "masq_batch": 50, "fisher_samples": 60,
        "eval_val": True, "adam_state": "keep"}  # fmt: skip

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Stop(Exception):
    """The stop a test makes after a phase's checkpoint is written."""


class StopAfter(PhaseCheckpoint):
    """A checkpoint whose runs are stopped right after phase ``stop`` is saved."""

    def __init__(self, path: Path, key: str, stop: int) -> None:
        super().__init__(path, key)
        self.stop = stop

    def save(self, phase: int, state: dict[str, Any], last: bool = False) -> None:
        super().save(phase, state, last)
        if phase == self.stop:
            raise Stop


def _same(a: protocol.Result, b: protocol.Result) -> None:
    """Two records of one run are equal in everything but the wall times."""
    assert a.config == b.config
    assert a.curves == b.curves
    assert a.metrics == b.metrics
    assert a.importance_summary == b.importance_summary
    assert a.best == b.best and a.last == b.last
    assert [len(v) for v in a.timings.values()] == [len(v) for v in b.timings.values()]
    assert a.meta.get("diverged") == b.meta.get("diverged")
    assert (a.weights is None) == (b.weights is None)
    for wa, wb in zip(a.weights or [], b.weights or [], strict=True):  # bit for bit
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _stopped_then_resumed(tmp_path: Path, stop: int, go: Any) -> list[protocol.Result]:
    """``go(checkpoint)`` stopped after phase ``stop``, then run again to the end."""
    path, key = tmp_path / "phases" / "k.pt", "k"
    with pytest.raises(Stop):
        go(StopAfter(path, key, stop))
    assert path.exists()
    assert PhaseCheckpoint(path, key).load() is not None
    out = go(PhaseCheckpoint(path, key))
    return out if isinstance(out, list) else [out]


@pytest.mark.parametrize("stop", [1, 2])
def test_a_stopped_stack_resumes_to_the_records_of_one_that_never_stopped(
    data_learnable: None, tmp_path: Path, stop: int
) -> None:
    base = RunConfig(**FOUR, scenario="task")
    configs = [
        base.with_(importance="none", lam=0.0),
        base.with_(importance="fisher", fisher_labels="predicted", lam=300.0),
        base.with_(importance="masq", lam=1e3, consolidation="online-ewc", gamma=0.7),
        base.with_(importance="mas", lam=10.0),
    ]
    tasks = protocol.make_tasks(base)
    d1 = protocol.train_first(base, tasks)
    imps = [protocol.compute_importance(c, d1, tasks) for c in configs]

    def go(point: PhaseCheckpoint | None) -> list[protocol.Result]:
        return protocol.continue_stacked(
            configs,
            d1,
            [i for i, _ in imps],
            tasks,
            [s for _, s in imps],
            keep_weights=True,
            checkpoint=point,
        )

    whole = go(None)
    for a, b in zip(_stopped_then_resumed(tmp_path, stop, go), whole, strict=True):
        _same(a, b)
        assert a.meta["stack"] == 4


@pytest.mark.parametrize(
    "changes",
    [
        {"importance": "fisher", "lam": 100.0},  # EWC: one anchor per task, Adam kept
        {"importance": "masq", "lam": 1e3, "consolidation": "online-ewc", "gamma": 0.8},
        {"importance": "kfac", "lam": 10.0, "adam_state": "reset"},  # a fresh Adam per phase
    ],
)
def test_a_stopped_run_resumes_to_the_record_of_one_that_never_stopped(
    data_learnable: None, tmp_path: Path, changes: dict[str, Any]
) -> None:
    config = RunConfig(**FOUR).with_(**changes)
    tasks = protocol.make_tasks(config)
    d1 = protocol.train_first(config, tasks)
    imp, seconds = protocol.compute_importance(config, d1, tasks)

    def go(point: PhaseCheckpoint | None) -> protocol.Result:
        return protocol.continue_run(config, d1, imp, tasks, seconds, checkpoint=point)

    (resumed,) = _stopped_then_resumed(tmp_path, 2, go)
    _same(resumed, go(None))
    assert resumed.weights is not None  # kept through the checkpoint, one state per phase
    assert len(resumed.weights) == 4


@pytest.mark.parametrize("stack", [True, False])
def test_a_resumed_chunk_reports_its_earlier_steps_as_restored(
    data_learnable: None, tmp_path: Path, stack: bool
) -> None:
    """The steps of the phases done before a stop reach the progress counter as restored (a
    bar leaves them out of its rate); the steps trained after it as taken now."""
    from masq.grid.progress import StepCounter
    from masq.training import heartbeat

    config = RunConfig(**FOUR, importance="fisher", lam=100.0)
    configs = [config, config.with_(lam=10.0)] if stack else [config]
    tasks = protocol.make_tasks(config)
    d1 = protocol.train_first(config, tasks)
    imp, seconds = protocol.compute_importance(config, d1, tasks)

    def go(point: PhaseCheckpoint | None) -> Any:
        if stack:
            n = len(configs)
            return protocol.continue_stacked(configs, d1, [imp] * n, tasks, [seconds] * n,
                                             checkpoint=point)  # fmt: skip
        return protocol.continue_run(config, d1, imp, tasks, seconds, checkpoint=point)

    path, key = tmp_path / "phases" / "k.pt", "k"
    with pytest.raises(Stop):
        go(StopAfter(path, key, 2))
    reports: list[tuple[float, float]] = []
    counter = StepCounter(["a"], 3 * 20, lambda runs, f, r: reports.append((f, r)), every=1e9)
    with heartbeat.listening(counter):
        go(PhaseCheckpoint(path, key))
    assert counter.restored_steps == 2 * 20  # phases 1 and 2 of 3 later ones, 20 steps each
    assert counter.steps == 3 * 20
    assert reports == [(2 / 3, 2 / 3)]  # at once; the rest waits for the next report


def test_runs_trained_alike_resume_with_their_merges(data_learnable: None, tmp_path: Path) -> None:
    base = RunConfig(**{**FOUR, "slt": "D3-3-4"}, importance="fisher", alpha_step=0.25)
    configs = [base.with_(consolidation="mean-imm"), base.with_(consolidation="mode-imm")]
    tasks = protocol.make_tasks(base)
    d1 = protocol.train_first(base, tasks)
    imps = [protocol.compute_importance(c, d1, tasks) for c in configs]

    def go(point: PhaseCheckpoint | None) -> list[protocol.Result]:
        return protocol.continue_runs(configs, d1, imps, tasks, keep_weights=True, checkpoint=point)

    whole = go(None)
    for a, b in zip(_stopped_then_resumed(tmp_path, 1, go), whole, strict=True):
        _same(a, b)
        assert a.imm == b.imm


def test_si_alone_resumes_after_training_task_1_again(data_learnable: None, tmp_path: Path) -> None:
    config = RunConfig(**FOUR, importance="si", lam=1.0, consolidation="online-ewc")
    tasks = protocol.make_tasks(config)

    def go(point: PhaseCheckpoint | None) -> protocol.Result:
        return protocol.run(config, tasks=tasks, checkpoint=point)

    (resumed,) = _stopped_then_resumed(tmp_path, 2, go)
    _same(resumed, go(None))


def test_a_grid_stopped_in_a_stack_resumes_it_and_clears_the_checkpoint(
    data_learnable: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A KeyboardInterrupt (Ctrl-C; SIGTERM is one in masq's command line) after phase 2 of a
    stack leaves its checkpoint; the grid run again resumes it (the stack trains phases 3-4
    only) and stores what a grid that never stopped stores."""
    base = RunConfig(**{**FOUR, "slt": "D3-3-2-2", "eval_val": False})
    configs = [base.with_(importance="none", lam=0.0)] + [
        base.with_(importance="fisher", lam=lam) for lam in (10.0, 1e3)
    ]
    kw: dict[str, Any] = {"stack": 4, "progress": False, "threads": 1}
    execute(configs, tmp_path / "whole", **kw)
    monkeypatch.setattr(group, "CHECKPOINT_EVERY", 0.0)
    save, phases = PhaseCheckpoint.save, []

    def stopping(self: PhaseCheckpoint, phase: int, state: dict[str, Any], last: bool = False):
        save(self, phase, state, last)
        phases.append(phase)
        if phase == 2 and phases.count(2) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(PhaseCheckpoint, "save", stopping)
    root = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        execute(configs, root, **kw)
    assert len(list((root / resume.PHASES_DIR).glob("*.pt"))) == 1
    assert not Store(root).stored_ids()
    capsys.readouterr()
    execute(configs, root, **kw)
    assert "grid: 3 run(s) resuming after phase 3 from " in capsys.readouterr().err
    assert phases == [1, 2, 3]  # resumed at phase 3 (0-based): 1 and 2 were not trained again
    assert not list((root / resume.PHASES_DIR).glob("*.pt"))
    whole, stopped = Store(tmp_path / "whole"), Store(root)
    for c in configs:
        a, b = stopped.read_record(run_id(c)), whole.read_record(run_id(c))
        for key in ("config", "curves", "metrics", "importance_summary", "best", "last"):
            assert a["result"][key] == b["result"][key], key


def test_the_checkpoint_file_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point = phase_checkpoint(tmp_path, ["a", "b"])
    assert point.path == tmp_path / "phases" / f"{checkpoint_key(['a', 'b'])}.pt"
    assert checkpoint_key(["a", "b"]) != checkpoint_key(["b", "a"])
    assert point.load() is None  # nothing saved yet
    point.save(1, {"x": torch.ones(2)}, last=True)  # the last phase: the records come next
    assert not point.path.exists()
    point.save(1, {"x": torch.ones(2)})
    phase, state = point.load() or (None, {})
    assert phase == 1 and torch.equal(state["x"], torch.ones(2))
    # another set of runs' file at this path is not theirs
    assert PhaseCheckpoint(point.path, "other").load() is None
    # a throttled checkpoint saves only once `every` seconds have passed
    slow = phase_checkpoint(tmp_path, ["c"], every=3600.0)
    slow.save(1, {})
    assert not slow.path.exists()
    messages: list[str] = []
    monkeypatch.setattr(resume, "warn", messages.append)
    # an unreadable file is ignored with a warning, never raised
    point.path.write_bytes(b"not a checkpoint")
    assert point.load() is None
    assert len(messages) == 1 and "ignoring the phase checkpoint" in messages[0]
    point.clear()
    assert not point.path.exists()
    point.clear()  # nothing to delete: no error

    def full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume, "atomic_write", full)
    point.save(2, {})
    point.save(3, {})  # warned once: no more tries
    assert len(messages) == 2 and "No space left on device" in messages[1]
    assert not point.path.exists()


def test_a_group_sending_its_records_back_sends_every_run_of_a_stack(
    data_learnable: None, tmp_path: Path
) -> None:
    """Ray without a shared disk: every stored run's record travels back, not only the last
    of its stack (the checkpoints are cleared after the stack, not per record)."""
    base = RunConfig(**{**FOUR, "slt": "D5-5", "eval_val": False})
    configs = tuple(base.with_(importance="fisher", lam=lam) for lam in (0.0, 10.0, 1e3))
    job = group.GroupJob(str(tmp_path), configs, stack=4, threads=1, return_records=True)
    outcome = group.run_group(job)
    assert set(outcome.records) == set(outcome.done) == {run_id(c) for c in configs}
    assert not list((tmp_path / resume.PHASES_DIR).glob("*.pt"))
