"""Progress within a grid's chunks: the training loops' heartbeat, the step count a chunk
needs, the workers' progress files and the bar they move (masq.grid.progress)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from masq import grid
from masq.config import RunConfig
from masq.grid import GroupJob, expand
from masq.grid import progress as flight
from masq.grid.plan import chunks, placement
from masq.grid.progress import GridBar
from masq.runid import run_id
from masq.store import Store
from masq.training import heartbeat
from tests.test_grid import synthetic_tasks, tiny_grid


def test_a_beat_without_a_listener_does_nothing_and_listeners_nest() -> None:
    heartbeat.beat(3)  # no listener: nothing happens, nothing fails
    outer: list[int] = []
    inner: list[int] = []
    with heartbeat.listening(outer.append):
        heartbeat.beat()
        with heartbeat.listening(inner.append):
            heartbeat.beat(2)
        heartbeat.beat(4)
    heartbeat.beat(5)
    assert outer == [1, 4] and inner == [2]


def test_the_step_counter_reports_every_few_seconds_and_holds_below_one() -> None:
    now = [0.0]
    seen: list[tuple[tuple[str, ...], float]] = []
    counter = flight.StepCounter(["a", "b"], 10, lambda r, f, _: seen.append((tuple(r), f)),
                                 every=5.0, clock=lambda: now[0])  # fmt: skip
    counter(3)
    assert seen == []  # not 5 s yet
    now[0] = 5.0
    counter(2)
    assert seen == [(("a", "b"), 0.5)]
    now[0] = 11.0
    counter(20)  # more steps than expected: held below 1 until the runs are stored
    assert seen[-1] == (("a", "b"), flight.HELD_BELOW)


def test_expected_steps_per_kind_of_chunk() -> None:
    a = RunConfig(slt="D2-2-2-2-2", iters1=7, iters2=5)
    b = RunConfig(slt="D5-5", iters1=7, iters2=3)
    assert flight.expected_steps([a, a, a], "stack") == 4 * 5
    assert flight.expected_steps([a, a], "alike") == 4 * 5
    assert flight.expected_steps([a, b], "single") == 4 * 5 + 1 * 3
    assert flight.expected_steps([a, b], "alone") == (7 + 20) + (7 + 3)
    assert flight.expected_steps([], "stack") == 0


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({}, "stack"),  # stacks of EWC runs
        ({"consolidation": ("mean-imm",), "lam": (0.0,)}, "alike"),  # runs trained alike
        ({"importance": ("si",), "consolidation": ("online-ewc",)}, "alone"),  # from phase 1
    ],
)
def test_every_chunk_takes_the_steps_it_expects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], kind: str
) -> None:
    """The steps the real loops beat while a chunk runs are exactly :func:`expected_steps`."""
    values: dict[str, Any] = {"slt": ("D4-3-3",), "hidden": ((8,),), "lr2": (1e-2,)}
    configs = expand(tiny_grid(**(values | changes)))
    counters: list[flight.StepCounter] = []

    class Kept(flight.StepCounter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            counters.append(self)

    monkeypatch.setattr(flight, "StepCounter", Kept)
    reports: list[tuple[int, float]] = []
    job = GroupJob(str(tmp_path), tuple(configs), stack=4, threads=1, tasks_fn=synthetic_tasks)
    outcome = grid.run_group(job, None, None, lambda runs, f, _: reports.append((len(runs), f)))
    assert not outcome.failed and len(outcome.done) == len(configs)
    kinds = {placement(c, 4)[0] for c in configs}
    assert kind in kinds and len(counters) == len(chunks(configs, 4)) >= 1
    assert [c.steps for c in counters] == [c.total for c in counters]
    assert reports[-1] == (0, 0.0)  # the last chunk's runs stored: nothing in flight


def test_progress_files_count_the_runs_in_flight_not_yet_stored(tmp_path: Path) -> None:
    folder = tmp_path / flight.PROGRESS_DIR
    folder.mkdir()
    (folder / "11.json").write_text(json.dumps({"runs": ["a", "b", "c"], "fraction": 0.5}))
    (folder / "12.json").write_text(json.dumps({"runs": ["d"], "fraction": 2.0}))
    (folder / "13.json").write_text("{half written")
    assert flight.in_flight(tmp_path, set()).work == pytest.approx(1.5 + flight.HELD_BELOW)
    assert flight.in_flight(tmp_path, {"a", "d"}).work == pytest.approx(1.0)
    flight.clear(tmp_path, -1)
    assert flight.in_flight(tmp_path, set()) == (0.0, {}) and not list(folder.iterdir())
    assert flight.in_flight(tmp_path / "nowhere", set()) == (0.0, {})


def test_a_worker_writes_its_progress_file_and_removes_it(tmp_path: Path) -> None:
    report = flight.file_reporter(tmp_path)
    report(["a", "b"], 0.25, 0.125)
    path = flight.progress_file(tmp_path)
    body = {"runs": ["a", "b"], "fraction": 0.25, "restored": 0.125}
    assert json.loads(path.read_text()) == body
    assert flight.in_flight(tmp_path, set()) == (pytest.approx(0.5), {"a,b": 0.25})
    assert flight.in_flight(tmp_path, {"a"}) == (pytest.approx(0.25), {"a,b": 0.125})
    flight.clear(tmp_path)
    assert not path.exists()


def quiet_bar(total: int, initial: int = 0) -> GridBar:
    """A shown bar that writes into a buffer (smoothing 0: its rate is (n − initial) / t)."""
    import io

    from tqdm import tqdm

    bar = GridBar(total, initial, enabled=False)
    bar.tqdm = tqdm(total=total, initial=initial, file=io.StringIO(), smoothing=0)
    return bar


def test_the_bar_only_moves_forward() -> None:
    bar = quiet_bar(6)
    bar.move(1.5)
    bar.move(1.2)  # a stack's fraction gone before its runs are listed: no step back
    bar.move(3.0)
    assert bar.n == pytest.approx(3.0)


def test_a_beat_of_restored_steps_goes_to_the_listener_s_restored_method() -> None:
    plain: list[int] = []
    with heartbeat.listening(plain.append):
        heartbeat.restored(40)  # a listener without `restored`: counted as steps
    assert plain == [40]
    reports: list[tuple[float, float]] = []
    counter = flight.StepCounter(["a"], 100, lambda r, f, b: reports.append((f, b)), every=1e9)
    with heartbeat.listening(counter):
        heartbeat.restored(40)
        heartbeat.beat(10)
    assert (counter.steps, counter.restored_steps) == (50, 40)
    assert reports == [(0.4, 0.4)]  # restored steps are reported at once


def test_restored_work_is_on_the_bar_but_not_in_its_rate() -> None:
    """Runs resumed from phase checkpoints move the bar without a rate: the work counts as
    done before the grid, like the runs stored before it (tqdm's average rate reads
    (n − initial) / elapsed, its smoothed one the steps update() is given)."""
    bar = quiet_bar(10, initial=2)
    bar.move(2 + 1.6, {"a,b": 1.5})  # two runs resumed at 75 %, and 0.05 of each trained since
    assert bar.n == pytest.approx(3.6) and bar.tqdm.initial == pytest.approx(3.5)
    bar.move(4.0, {})  # the runs stored: their restored work still counts, not twice
    assert bar.n == pytest.approx(4.0) and bar.tqdm.initial == pytest.approx(3.5)
    bar.move(4.0, {"a,b": 1.0, "c": 0.5})  # a lower reading of a,b keeps its largest
    assert bar.restored == {"a,b": 1.5, "c": 0.5}
    assert bar.n == pytest.approx(4.5) and bar.tqdm.initial == pytest.approx(4.0)
    hidden = GridBar(10, 0, enabled=False)
    hidden.move(3.0, {"a": 2.0})  # a disabled bar: nothing to show, nothing fails
    hidden.close()


def test_a_grid_in_a_pool_shows_its_stacks_in_flight(tmp_path: Path) -> None:
    """Two workers: the files they write while a stack trains are read by the parent and
    leave nothing behind once the grid has stored every run."""
    configs = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,), iters2=(400,)))
    summary = grid.execute(configs, tmp_path, workers=2, stack=4, progress=False, threads=1,
                           tasks_fn=synthetic_tasks)  # fmt: skip
    assert summary.done == len(configs) and not summary.failed
    assert not list((tmp_path / flight.PROGRESS_DIR).glob("*.json"))
    assert {run_id(c) for c in configs} <= Store(tmp_path).stored_ids()


def test_the_wait_before_the_first_step_is_not_in_the_smoothed_rate() -> None:
    """A grid's first fraction comes after data loading and task-1 work the steps do not
    count; tqdm's smoothed rate starts at that first step, so an ETA read a few seconds later
    is the steps'."""
    import io

    from tqdm import tqdm

    now = [0.0]
    bar = GridBar(10, 0, enabled=False)
    bar.tqdm = tqdm(total=10, file=io.StringIO(), smoothing=0.05, mininterval=0.1)
    bar.tqdm._time = lambda: now[0]
    bar.tqdm.start_t = bar.tqdm.last_print_t = 0.0
    now[0] = 600.0  # ten minutes before any step
    bar.move(0.001)
    for _ in range(3):
        now[0] += 5.0
        bar.move(bar.n + 0.01)  # 0.01 run every 5 s: 500 s per run
    rate = bar.tqdm.format_dict["rate"]
    assert 450 < 1 / rate < 500  # 0.011, 0.01, 0.01 run in 5 s each (the wait in: 18,000)
    assert bar.tqdm.format_dict["elapsed"] == pytest.approx(615.0)  # elapsed stays true
