"""Real processes killed for real: a grid's pool workers die with their parent (``kill -9`` or
a plain ``kill``), SIGTERM is handled like Ctrl-C, and two grids never share a results dir.

Each test starts ``masq grid`` (with the tiny synthetic tasks below) in a child process,
records every descendant of it from /proc while its two workers compute, kills it, and checks
that none of those processes survives; a re-run then finishes the grid with counts that add
up. Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from masq import grid
from masq import tasks as masq_tasks
from masq.config import RunConfig
from masq.protocol import stream_seed
from masq.runid import run_id
from masq.store import Store, check_record
from tests.synthetic import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
# each test starts Python processes that import torch: seconds each, more on a busy machine
pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc"),
    pytest.mark.slow,
]

# 2 architectures x 3 lr2 x 2 λ = 12 runs in 2 groups; phase 2 long enough to kill mid-way
GRID_TOML = """slt = ["D5-5"]
hidden = [[8], [6, 4]]
iters1 = 10
iters2 = 300
eval_every = 50
batch_size = 20
masq_batch = 50
lr2 = [1e-2, 1e-3, 1e-4]
lam = [0, 10]
"""


def synthetic_tasks(config: RunConfig) -> list[masq_tasks.Task]:
    """The tasks of ``config`` on a tiny synthetic dataset (importable by spawned workers)."""
    data = synthetic_dataset(300, 60, 100)
    return masq_tasks.make(config.slt, dataset=data, seed=stream_seed(config.seed, "tasks"))


def grid_file(directory: Path) -> Path:
    path = directory / "grid.toml"
    path.write_text(GRID_TOML, encoding="utf-8")
    return path


def grid_configs(directory: Path) -> list[RunConfig]:
    return grid.expand(grid.load_grid_file(grid_file(directory), grid.Grid()))


def grid_args(results: Path, *extra: str) -> list[str]:
    """``masq grid`` of :data:`GRID_TOML` into ``results``."""
    toml = grid_file(results.parent)
    return ["grid", "--preset", "none", "--grid", str(toml), "--results", str(results), *extra]


def start_grid(results: Path) -> subprocess.Popen[bytes]:
    """``masq grid --workers 2`` on the synthetic tasks, in a new process."""
    argv = grid_args(results, "--workers", "2", "--threads", "1", "--stack", "1", "--no-progress")
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import masq.cli.grid_cmd as grid_cmd
from tests.test_processes import synthetic_tasks
grid_cmd.tasks_fn = lambda data_dir: synthetic_tasks
from masq.cli import main
sys.exit(main({argv!r}))
"""
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)


def stat_of(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of process ``pid`` from /proc, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every descendant of ``pid``."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := stat_of(int(entry.name))) is not None:
            parents[int(entry.name)] = (info[1], info[2])
    out: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, (ppid, start) in parents.items():
            if ppid == p and child not in out:
                out[child] = start
                frontier.append(child)
    return out


def alive(processes: dict[int, int]) -> list[int]:
    """The processes of ``processes`` still running (a zombie or a reused pid is gone)."""
    running = []
    for pid, start in processes.items():
        info = stat_of(pid)
        if info is not None and info[2] == start and info[0] != "Z":
            running.append(pid)
    return running


def wait_for(predicate: object, seconds: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stored(results: Path) -> list[Path]:
    return sorted((results / "runs").glob("*.json"))


def kill_mid_grid(results: Path, sig: int) -> tuple[dict[int, int], subprocess.Popen[bytes], int]:
    """Start the grid, wait until its 2 workers have stored 2 runs, send ``sig``; the
    descendants it had then (workers, resource tracker), the process, the runs stored then."""
    proc = start_grid(results)
    try:
        wait_for(lambda: len(stored(results)) >= 2, 90, proc)
        family = descendants(proc.pid)
        os.kill(proc.pid, sig)
        at_kill = len(stored(results))
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return family, proc, at_kill


def assert_all_gone(family: dict[int, int], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = alive(family)
    for pid in survivors:  # leave nothing running when the test fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"still running after the parent died: {survivors}"


def assert_resumes(results: Path) -> None:
    """Every stored record is whole and valid; a re-run stores the rest, counts adding up."""
    before = stored(results)
    for path in before:
        check_record(path)
    configs = grid_configs(results.parent)
    summary = grid.execute(
        configs, results, stack=6, progress=False, threads=1, tasks_fn=synthetic_tasks
    )
    assert summary.total == len(configs) == 12
    assert summary.skipped == len(before) and not summary.failed
    assert summary.skipped + summary.done == summary.total
    assert {p.stem for p in stored(results)} == {run_id(c) for c in configs}
    assert not list(results.rglob("*.tmp"))


def test_kill_9_of_a_two_worker_grid_leaves_no_process_behind(tmp_path: Path) -> None:
    results = tmp_path / "res"
    family, proc, at_kill = kill_mid_grid(results, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert len(family) >= 2  # the two workers (and the resource tracker)
    assert_all_gone(family)
    err = proc.stderr.read().decode() if proc.stderr else ""  # the tracker's output too
    assert "Traceback" not in err, err  # (the tracker warns of the semaphores it cleans up)
    time.sleep(1.0)
    assert 2 <= at_kill <= len(stored(results)) <= at_kill + 2 < 12  # no worker went on
    assert_resumes(results)


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path) -> None:
    results = tmp_path / "res"
    family, proc, at_kill = kill_mid_grid(results, signal.SIGTERM)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        "masq: terminated (SIGTERM); nothing half-written was kept (re-run to resume)."
    )
    assert "Traceback" not in err and "leaked" not in err
    assert_all_gone(family, seconds=2.0)  # terminated by the parent itself, not by a watchdog
    assert len(stored(results)) <= at_kill + 2  # no worker went on: at most the runs in flight
    assert_resumes(results)


def test_a_worker_dies_with_its_parent_without_prctl(tmp_path: Path) -> None:
    """The fallback of platforms without PR_SET_PDEATHSIG: the worker's watch thread."""
    pid_file = tmp_path / "child.pid"
    script = f"""
import multiprocessing, sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.test_processes import child_without_prctl
if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(
        target=child_without_prctl, args=({str(pid_file)!r},)).start()
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"), 60, proc)
        child = int(pid_file.read_text())
        family = {child: stat_of(child)[2]}  # type: ignore[index]
        assert alive(family) == [child]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_all_gone(family, seconds=5.0)


def child_without_prctl(pid_file: str) -> None:
    import ctypes

    from masq.grid import executors

    def no_libc(*args: object, **kwargs: object) -> None:
        raise OSError("no prctl here")

    ctypes.CDLL = no_libc  # type: ignore[assignment,misc]
    executors.die_with_parent(os.getppid(), interval=0.1)
    Path(pid_file).write_text(f"{os.getpid()}\n")
    time.sleep(60)


def hold_lock_script(results: Path, seconds: float) -> str:
    return f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from masq.grid.executors import results_lock
from masq.store import Store
with results_lock(Store({str(results)!r})):
    print("locked", flush=True)
    time.sleep({seconds})
"""


def test_a_second_grid_on_the_same_results_refuses_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from masq.cli import main

    results = tmp_path / "res"
    script = hold_lock_script(results, 60)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        assert main(grid_args(results, "--workers", "1", "--no-progress")) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"masq: error: results dir {str(results)!r} is in use by another masq process (pid "
            f"{holder.pid}); wait for it to end (`masq grid --wait` waits by itself), or use "
            "another --results directory"
        )
        assert stored(results) == []
        holder.kill()  # a crash releases the lock at once
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    configs = [c.with_(iters2=10) for c in grid_configs(tmp_path)[:2]]
    summary = grid.execute(configs, results, progress=False, threads=1, tasks_fn=synthetic_tasks)
    assert summary.done == 2


def test_wait_waits_for_the_other_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "res"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold_lock_script(results, 1.5)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        configs = [c.with_(iters2=10) for c in grid_configs(tmp_path)[:2]]
        summary = grid.execute(
            configs, results, progress=False, threads=1, tasks_fn=synthetic_tasks, wait=True
        )
        assert holder.wait(5) == 0  # it ended, releasing the lock, before this grid started
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert summary.done == 2 and not summary.failed
    assert f"masq: waiting for process {holder.pid} to release {results}" in capsys.readouterr().err
    assert json.loads((results / "meta.json").read_text())["version"] == 2
    assert Store(results).stored_ids() == {run_id(c) for c in configs}


def test_a_process_holding_the_lock_takes_it_again_and_others_still_wait(
    tmp_path: Path,
) -> None:
    """A command of several rounds (a preset's tuning runs, then its table runs) holds the
    results dir's lock across them: inside it, a round's own lock is taken at once, and
    another process still finds the dir in use until the outer block ends."""
    import fcntl

    from masq.grid.executors import results_lock
    from masq.store import Store

    store = Store(tmp_path / "res")

    def held_elsewhere() -> bool:  # a new open file description, as another process has
        fd = os.open(store.root / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    with results_lock(store):
        with results_lock(store):  # the second round
            assert held_elsewhere()
        assert held_elsewhere()  # the inner block's end does not release it
    assert not held_elsewhere()
