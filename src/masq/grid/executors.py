"""Executors: where a grid's groups run, with progress, resumption and fail-fast.

``local``: a pool of ``workers`` spawned processes, ``cores // workers`` torch threads each,
one group per task (``workers=1`` runs in this process). ``ray``: the same groups as
``ray.remote`` tasks on a Ray cluster. Either way each finished run is written to the store as
soon as its stack finishes; failed runs are recorded in DIR/errors and the grid goes on,
except when every run of the first group to finish fails with one and the same exception:
that is a bug, not bad luck, and the grid stops at once with its traceback
(:class:`GridAborted`).

Before any work: the devices must exist here (local executor), the results dir must be
writable, and it is locked (DIR/.lock, :func:`results_lock`): a second grid on it refuses
with the first one's pid (or waits). Pool workers cannot outlive the grid: on Linux the
kernel kills them when their parent dies (``PR_SET_PDEATHSIG``), and everywhere a thread in
each worker ends it once its parent is gone; an interrupted or failed grid terminates them.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback as tb
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from masq.config import Executor, RunConfig, choice
from masq.errors import ConfigError, MasqError
from masq.fileio import LockHeld, atomic_write, exclusive_lock
from masq.grid.connect import RAY_TIMEOUT, connect_ray
from masq.grid.group import GroupJob, GroupOutcome, TasksCache, TasksFn, run_group
from masq.grid.plan import one_by_one, plan, spread
from masq.grid.progress import GridBar, in_flight
from masq.grid.progress import clear as clear_progress
from masq.protocol.resume import PHASES_DIR
from masq.runid import run_id
from masq.runtime import default_threads, resolve_device
from masq.store import NotStored, Store

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class GridStopped(MasqError):
    """A worker process died (killed, e.g. ``kill -9`` or out of memory): the grid stopped,
    the runs it had not finished are recorded as failed, and a re-run redoes them."""


class GridAborted(RuntimeError):
    """Every run of the first finished group failed with the same exception (a bug)."""

    def __init__(self, message: str, traceback: str) -> None:
        super().__init__(message)
        self.traceback = traceback


def check_first(out: list[tuple[GroupJob, GroupOutcome]]) -> None:
    """Raise :class:`GridAborted` when the first finished group (``out[0]``, called as soon
    as it is there) failed in every run with one exception."""
    if len(out) != 1:
        return
    job, outcome = out[0]
    message = same_failure(job, outcome)
    if message is not None:
        trace = next(iter(outcome.traces.values()), "")
        raise GridAborted(
            f"every run of the first group failed with the same error, so the grid stopped "
            f"(a bug, not bad luck): {message}",
            trace,
        )


def same_failure(job: GroupJob, outcome: GroupOutcome) -> str | None:
    """The one message when every run of ``job`` failed with it (and none finished)."""
    if outcome.done or not outcome.failed:
        return None
    if len(outcome.failed) < len({run_id(c) for c in job.configs}):
        return None
    messages = set(outcome.failed.values())
    return messages.pop() if len(messages) == 1 else None


@dataclass
class Summary:
    """What :func:`execute` did: runs in the grid, already stored, finished now, failed."""

    total: int
    skipped: int
    done: int
    failed: dict[str, str]
    d1_trained: int
    importance_computed: int
    seconds: float


def _init_worker(threads: int, parent: int, gpu_slot: Any = None) -> None:
    die_with_parent(parent)
    torch.set_num_threads(threads)
    if gpu_slot is not None and torch.cuda.is_available():  # one worker per GPU
        with gpu_slot.get_lock():
            index = gpu_slot.value
            gpu_slot.value += 1
        torch.cuda.set_device(index % torch.cuda.device_count())
    # tqdm's default lock holds a multiprocessing semaphore, which a worker terminated by a
    # stopped grid would leave to the resource tracker (a "leaked semaphore" warning)
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def die_with_parent(parent: int, interval: float = 0.5) -> None:
    """End this process when process ``parent`` ends: on Linux the kernel sends SIGKILL at the
    parent's death (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread checks every
    ``interval`` seconds whether this process was re-parented and exits then."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the thread only
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="masq-parent-watch", daemon=True).start()


@contextmanager
def results_lock(store: Store, *, wait: bool = False) -> Iterator[None]:
    """Hold DIR/.lock of ``store`` for the ``with`` block: one grid per results dir at a time.
    Held by another process: a one-line ConfigError naming its pid, or (``wait``) a line on
    stderr and a wait. Held by this process already (a command of several rounds, e.g. a
    preset's tuning runs and then its table runs, holds it across them): nothing more to
    do. Temporary files left by a process killed mid-write are removed."""
    root = store.root.resolve()
    if root in _HELD:
        yield
        return

    def waiting(pid: int | None) -> None:
        print(f"masq: waiting for process {pid} to release {store.root}", file=sys.stderr)

    try:
        with exclusive_lock(store.root / ".lock", wait=wait, on_wait=waiting):
            phases = store.root / PHASES_DIR  # phase checkpoints (masq.protocol.resume)
            for folder in (
                store.root,
                store.runs,
                store.errors,
                store.d1,
                store.importance,
                phases,
            ):
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
            clear_progress(store.root, -1)  # of workers of a grid that was stopped
            _HELD.add(root)
            try:
                yield
            finally:
                _HELD.discard(root)
    except LockHeld as err:
        raise ConfigError(
            f"results dir {str(store.root)!r} is in use by another masq process (pid "
            f"{err.pid if err.pid is not None else 'unknown'}); wait for it to end (`masq "
            "grid --wait` waits by itself), or use another --results directory"
        ) from None


_HELD: set[Path] = set()  # results dirs whose lock this process holds (:func:`results_lock`)


def device_kind(device: str) -> str:
    """ "cpu" or "cuda" (``auto`` resolved on this machine): what changes a run's numbers."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(device).startswith("cuda") else "cpu"


DEVICES_FILE = "devices.json"


def check_device_kind(store: Store, configs: Sequence[RunConfig]) -> None:
    """One device kind per results directory: float rounding differs between CPU and GPU, and
    a run id does not hold the device, so a grid on another kind than the directory's first
    one is refused (one line) instead of mixing numbers under one id."""
    kinds = sorted({device_kind(str(c.device)) for c in configs})
    if len(kinds) > 1:
        raise ConfigError(f"one grid runs on one device kind, got {kinds}; split the grid")
    if not kinds:
        return
    path = store.root / DEVICES_FILE
    if path.exists():
        try:
            held = json.loads(path.read_text(encoding="utf-8"))["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            held = None
        if held is not None and held != kinds[0]:
            raise ConfigError(
                f"results dir {str(store.root)!r} holds runs computed on {held}; runs on "
                f"{kinds[0]} would share their ids with different rounding: use another "
                "--results directory"
            )
        if held is not None:
            return
    atomic_write(path, json.dumps({"kind": kinds[0]}) + "\n")


def check_devices(configs: Sequence[RunConfig]) -> None:
    """A one-line ConfigError unless every device of ``configs`` exists on this machine."""
    for device in sorted({str(c.device) for c in configs}):
        resolve_device(device)


def execute(
    configs: Sequence[RunConfig],
    root: str | os.PathLike[str],
    *,
    workers: int = 1,
    stack: int = 16,
    executor: Executor | str = Executor.LOCAL,
    address: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    tasks_fn: TasksFn | None = None,
    wait: bool = False,
    ray_timeout: float = RAY_TIMEOUT,
) -> Summary:
    """Run every configuration not yet stored in results dir ``root``; see the module doc.

    ``threads`` per worker defaults to ``cores // workers`` (at least 1); with Ray, each task
    asks for that many CPUs. ``wait``: wait for another grid holding ``root`` instead of
    refusing. ``ray_timeout``: seconds to reach the Ray cluster at ``address``
    (:func:`connect_ray`). Returns a :class:`Summary`; failures are in DIR/errors. A worker
    that dies (``kill -9``, out of memory) stops the grid with :class:`GridStopped` after its
    unfinished runs are recorded as failed (a re-run redoes them).
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if stack < 1:
        raise ConfigError(f"--stack must be >= 1, got {stack}")
    if not (isinstance(ray_timeout, int | float) and 0 < ray_timeout < math.inf):
        raise ConfigError(f"--ray-timeout must be a number of seconds > 0, got {ray_timeout!r}")
    executor = choice(Executor, executor, "executor")
    if executor == Executor.LOCAL:  # Ray workers may have GPUs this machine lacks
        check_devices(configs)
    start = time.perf_counter()
    store = Store(root)
    store.check_writable()
    all_ids = {run_id(c) for c in configs}
    if threads is None:
        threads = default_threads(workers) if executor == Executor.LOCAL else 1
    with results_lock(store, wait=wait):
        check_device_kind(store, configs)
        stored = store.stored_ids()
        todo = [c for c in configs if run_id(c) not in stored]
        if progress and stack > 1:
            for reason, n in one_by_one(todo, stack).items():
                print(f"grid: {n} run(s) go one by one: {reason}", file=sys.stderr)
        ray = executor == Executor.RAY
        pool = 1 if ray else workers  # a local pool: no worker idles while a group has runs
        jobs = [
            GroupJob(str(root), part, stack, threads, tasks_fn, return_records=ray)
            for part in spread(plan(todo), pool, stack, order=ray or workers > 1)
        ]
        summary = Summary(len(all_ids), len(all_ids & stored), 0, {}, 0, 0, 0.0)
        bar = GridBar(len(all_ids), len(all_ids & stored), progress)
        try:
            if ray:
                outcomes = _run_ray(jobs, store, (address, ray_timeout), threads, bar, all_ids)
            elif workers == 1:
                outcomes = _run_inline(jobs, threads, bar)
            else:
                outcomes = _run_pool(jobs, store, workers, threads, bar, all_ids)
        finally:
            bar.close()
    for _job, outcome in outcomes:
        summary.done += len(outcome.done)
        summary.failed.update(outcome.failed)
        summary.d1_trained += outcome.d1_trained
        summary.importance_computed += outcome.importance_computed
    summary.seconds = time.perf_counter() - start
    return summary


def _poll(bar: GridBar, store: Store, ids: set[str]) -> None:
    """Move the bar to the runs stored and in flight."""
    stored = store.listed_ids() & ids
    flight = in_flight(store.root, stored)
    bar.move(len(stored) + flight.work, flight.restored)


def _run_inline(
    jobs: list[GroupJob], threads: int, bar: GridBar
) -> list[tuple[GroupJob, GroupOutcome]]:
    before = torch.get_num_threads()
    out = []
    cache = TasksCache()  # the groups of one grid share their tasks
    stored = [float(bar.n)]  # the runs stored so far

    def done(n: int) -> None:
        stored[0] += n
        bar.move(stored[0])

    def moving(runs: Sequence[str], fraction: float, restored: float = 0.0) -> None:
        bar.move(stored[0] + fraction * len(runs), {",".join(runs): restored * len(runs)})

    try:
        for job in jobs:
            one = dataclasses.replace(job, threads=threads)
            out.append((job, run_group(one, done, cache, moving)))
            check_first(out)
    finally:
        torch.set_num_threads(before)
    return out


def _failed_job(store: Store, job: GroupJob, err: BaseException | str) -> GroupOutcome:
    """Every run of ``job`` not stored, recorded as failed with ``err`` (an exception or a
    message) in DIR/errors."""
    outcome = GroupOutcome()
    if isinstance(err, BaseException):
        message = f"{type(err).__name__}: {err}"
        trace = "".join(tb.format_exception(type(err), err, err.__traceback__))
    else:
        message, trace = err, ""
    for c in job.configs:
        rid = run_id(c)
        if not store.has(rid):
            store.write_error(c, err)
            outcome.failed[rid] = message
            outcome.traces[rid] = trace
    return outcome


def _run_pool(
    jobs: list[GroupJob], store: Store, workers: int, threads: int, bar: GridBar, ids: set[str]
) -> list[tuple[GroupJob, GroupOutcome]]:
    context = multiprocessing.get_context("spawn")
    out: list[tuple[GroupJob, GroupOutcome]] = []
    cuda = any(str(c.device).startswith("cuda") for j in jobs for c in j.configs)
    gpu_slot = context.Value("i", 0) if cuda else None
    with cf.ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(threads, os.getpid(), gpu_slot),
    ) as pool:
        futures = {pool.submit(run_group, job): job for job in jobs}
        pending = set(futures)
        workers_seen = dict(getattr(pool, "_processes", None) or {})
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=2.0, return_when=cf.FIRST_COMPLETED)
                workers_seen.update(getattr(pool, "_processes", None) or {})
                broken = False
                for fut in finished:
                    job = futures[fut]
                    try:
                        out.append((job, fut.result()))
                    except cf.process.BrokenProcessPool:  # a worker died: every job is lost
                        broken = True
                        continue
                    except Exception as err:  # the group itself failed: record, go on
                        out.append((job, _failed_job(store, job, err)))
                    check_first(out)
                if broken:  # the others are stopped first: their exit codes tell apart
                    for proc in list(workers_seen.values()):  # the dead one's exit code now,
                        proc.join(timeout=0.2)  # before a loaded machine reaps it elsewhere
                    stop_workers(pool)
                    deadline = time.monotonic() + 10.0  # a big process takes a while to go
                    for proc in list(workers_seen.values()):  # on a loaded machine: every
                        proc.join(max(0.0, deadline - time.monotonic()))  # one ended, reaped
                    raise _stopped(store, jobs, out, list(workers_seen.values()))
                _poll(bar, store, ids)
        except BaseException:  # Ctrl-C, SIGTERM (masq.cli), a stop: no worker goes on
            stop_workers(pool)
            raise
    return out


def death_text(processes: Sequence[Any]) -> str:
    """How the dead ones among ``processes`` (multiprocessing processes, stopped) ended, e.g.
    "killed by SIGKILL: kill -9 or the out-of-memory killer"; the SIGTERM of the workers the
    grid stopped itself is left out when another cause is there."""
    found = {p.exitcode for p in processes if p.exitcode not in (None, 0)}
    if len(found) > 1:
        found.discard(-signal.SIGTERM)
    if not found:
        return "it ended without a word"
    words = []
    for code in sorted(found):
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            why = ": kill -9 or the out-of-memory killer" if -code == signal.SIGKILL else ""
            words.append(f"killed by {name}{why}")
        else:
            words.append(f"exit status {code}")
    return ", ".join(words)


def _stopped(
    store: Store,
    jobs: Sequence[GroupJob],
    out: list[tuple[GroupJob, GroupOutcome]],
    processes: Sequence[Any],
) -> GridStopped:
    """The :class:`GridStopped` of a broken pool: every run of a job not finished in ``out``
    and not stored is recorded as failed in DIR/errors (so the next start redoes it)."""
    finished = {id(job) for job, _ in out}
    lost = [job for job in jobs if id(job) not in finished]
    why = f"a grid worker process died ({death_text(processes)})"
    failed = 0
    for job in lost:
        failed += len(_failed_job(store, job, f"WorkerDied: {why}").failed)
    return GridStopped(
        f"{why}, so the grid stopped; its {failed} unfinished run(s) are recorded as failed "
        f"in {store.errors}, every finished run is kept: re-run the same command to redo them"
    )


def stop_workers(pool: cf.ProcessPoolExecutor, grace: float = 5.0) -> None:
    """Cancel what has not started and terminate the workers (SIGTERM, then SIGKILL after
    ``grace`` seconds): a run in flight is never half-written (atomic writes), and resumes
    from its last phase checkpoint (:mod:`masq.protocol.resume`) when the grid runs again."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


def _run_ray(
    jobs: list[GroupJob],
    store: Store,
    where: tuple[str | None, float],
    threads: int,
    bar: GridBar,
    ids: set[str],
) -> list[tuple[GroupJob, GroupOutcome]]:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is an optional extra
        raise ConfigError("--executor ray needs Ray: pip install 'masq-ewc[ray]'") from None
    started = False
    if not ray.is_initialized():
        connect_ray(ray, *where)
        started = True
    try:
        devices = {str(c.device) for j in jobs for c in j.configs}
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        # CUDA runs ask for a GPU; "auto" runs too where the cluster has GPUs to give
        wants = any(d.startswith("cuda") for d in devices) or ("auto" in devices and has_gpus)
        gpus = 1 if wants else 0
        remote = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=1)(run_group)
        refs = {remote.remote(job): job for job in jobs}
        pending = list(refs)
        out: list[tuple[GroupJob, GroupOutcome]] = []
        while pending:
            finished, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in finished:
                job = refs[ref]
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # a task failed outside run_group's own handling
                    out.append((job, _failed_job(store, job, err)))
                    continue
                for rid, text in outcome.records.items():
                    try:
                        store.write_record_text(rid, text)
                    except NotStored as err:  # saved elsewhere (a warning said where)
                        outcome.done.remove(rid)
                        outcome.failed[rid] = f"NotStored: {err}"
                by_id = {run_id(c): c for c in job.configs}
                for rid, message in outcome.failed.items():
                    if not (store.errors / f"{rid}.json").exists():
                        store.write_error(by_id[rid], message)
                outcome.records = {}
                out.append((job, outcome))
                check_first(out)
            _poll(bar, store, ids)
        return out
    finally:
        if started:
            ray.shutdown()
