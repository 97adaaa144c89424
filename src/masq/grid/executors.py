"""Executors: where a grid's groups run, with progress, resumption and fail-fast.

``local``: a pool of ``workers`` spawned processes, ``cores // workers`` torch threads each,
one group per task (``workers=1`` runs in this process). ``ray``: the same groups as
``ray.remote`` tasks on a Ray cluster. Either way each finished run is written to the store as
soon as its stack finishes; failed runs are recorded in DIR/errors and the grid goes on,
except when every run of the first group to finish fails with one and the same exception:
that is a bug, not bad luck, and the grid stops at once with its traceback
(:class:`GridAborted`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import time
import traceback as tb
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from masq.config import Executor, RunConfig, choice
from masq.errors import ConfigError
from masq.grid.group import GroupJob, GroupOutcome, TasksFn, clear_tasks_cache, run_group
from masq.grid.plan import plan
from masq.store import Store, run_id


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


def cpu_count() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


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
) -> Summary:
    """Run every configuration not yet stored in results dir ``root``; see the module doc.

    ``threads`` per worker defaults to ``cores // workers`` (at least 1); with Ray, each task
    asks for that many CPUs. Returns a :class:`Summary`; failures are in DIR/errors.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if stack < 1:
        raise ConfigError(f"--stack must be >= 1, got {stack}")
    executor = choice(Executor, executor, "executor")
    start = time.perf_counter()
    store = Store(root)
    stored = store.stored_ids()
    all_ids = {run_id(c) for c in configs}
    todo = [c for c in configs if run_id(c) not in stored]
    groups = plan(todo)
    if threads is None:
        threads = max(1, cpu_count() // workers) if executor == Executor.LOCAL else 1
    jobs = [
        GroupJob(
            str(root), g.configs, stack, threads, tasks_fn, return_records=executor == Executor.RAY
        )
        for g in groups
    ]
    summary = Summary(len(all_ids), len(all_ids & stored), 0, {}, 0, 0, 0.0)
    bar = _progress_bar(len(all_ids), len(all_ids & stored), progress)
    try:
        if executor == Executor.RAY:
            outcomes = _run_ray(jobs, store, address, threads, bar, all_ids)
        elif workers == 1:
            outcomes = _run_inline(jobs, threads, bar)
        else:
            outcomes = _run_pool(jobs, store, workers, threads, bar, all_ids)
    finally:
        bar.close()
        clear_tasks_cache()
    for _job, outcome in outcomes:
        summary.done += len(outcome.done)
        summary.failed.update(outcome.failed)
        summary.d1_trained += outcome.d1_trained
        summary.importance_computed += outcome.importance_computed
    summary.seconds = time.perf_counter() - start
    return summary


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="grid",
        unit="run",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.05,
    )


def _poll(bar: Any, store: Store, ids: set[str]) -> None:
    n = len(store.stored_ids() & ids)
    if n > bar.n:
        bar.update(n - bar.n)


def _run_inline(
    jobs: list[GroupJob], threads: int, bar: Any
) -> list[tuple[GroupJob, GroupOutcome]]:
    before = torch.get_num_threads()
    out = []
    try:
        for job in jobs:
            out.append((job, run_group(dataclasses.replace(job, threads=threads), bar.update)))
            check_first(out)
    finally:
        torch.set_num_threads(before)
    return out


def _failed_job(store: Store, job: GroupJob, err: BaseException) -> GroupOutcome:
    outcome = GroupOutcome()
    trace = "".join(tb.format_exception(type(err), err, err.__traceback__))
    for c in job.configs:
        rid = run_id(c)
        if not store.has(rid):
            store.write_error(c, err)
            outcome.failed[rid] = f"{type(err).__name__}: {err}"
            outcome.traces[rid] = trace
    return outcome


def _run_pool(
    jobs: list[GroupJob], store: Store, workers: int, threads: int, bar: Any, ids: set[str]
) -> list[tuple[GroupJob, GroupOutcome]]:
    context = multiprocessing.get_context("spawn")
    out: list[tuple[GroupJob, GroupOutcome]] = []
    with cf.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(run_group, job): job for job in jobs}
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=2.0, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    job = futures[fut]
                    try:
                        out.append((job, fut.result()))
                    except Exception as err:  # a worker died (e.g. killed): record, go on
                        out.append((job, _failed_job(store, job, err)))
                    check_first(out)
                _poll(bar, store, ids)
        except (KeyboardInterrupt, GridAborted):
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return out


def _run_ray(
    jobs: list[GroupJob], store: Store, address: str | None, threads: int, bar: Any, ids: set[str]
) -> list[tuple[GroupJob, GroupOutcome]]:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is an optional extra
        raise ConfigError("--executor ray needs Ray: pip install 'masq-ewc[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        gpus = 1 if any(str(c.device).startswith("cuda") for j in jobs for c in j.configs) else 0
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
                    store.write_record_text(rid, text)
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
