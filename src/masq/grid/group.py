"""One group of a grid: its task-1 state (cached), its importance passes (cached), its runs.

The caches are safetensors files with a checksummed sidecar
(:meth:`masq.store.Store.save_tensors`): one that is missing, truncated or changed is named in
a warning and recomputed, and a cache that cannot be written only costs a recomputation later.

Runs the stacked engine takes (:func:`masq.protocol.stackable`: EWC and online EWC with a
diagonal measure, any number of tasks) are continued K at a time as one stacked model
(:func:`masq.protocol.continue_stacked`); the others go one by one
(:func:`masq.protocol.continue_run`; the documentation's speed page, "Stacked runs of more
than two tasks"). A CUDA out-of-memory error in a stack retries it as two stacks of half the
size.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import traceback as tb
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from masq import protocol
from masq.config import DATA_FIELDS, RunConfig
from masq.fileio import error_text, warn
from masq.grid import progress
from masq.grid.plan import alone, chunks, importance_key, needs_first_pass, placement
from masq.plugins import load_from_env
from masq.protocol import D1State
from masq.protocol.resume import PhaseCheckpoint, phase_checkpoint
from masq.runid import d1_key, run_id
from masq.store import NotStored, Store
from masq.tasks import Task
from masq.training import AdamMoments, heartbeat

TasksFn = Callable[[RunConfig], list[Task]]
CHECKPOINT_EVERY = 60.0  # seconds: a phase checkpoint at most this often (what a stop may lose)


@dataclass(frozen=True)
class GroupJob:
    """One unit of work for an executor: a group's runs and how to run them (picklable)."""

    root: str
    configs: tuple[RunConfig, ...]
    stack: int = 16
    threads: int | None = None
    tasks_fn: TasksFn | None = None  # default: masq.protocol.make_tasks
    return_records: bool = False  # send finished records back (Ray without a shared disk)


@dataclass
class GroupOutcome:
    """What a group's job did: ids finished, ids failed (messages and tracebacks), work done."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    traces: dict[str, str] = field(default_factory=dict)
    records: dict[str, str] = field(default_factory=dict)
    d1_trained: int = 0
    importance_computed: int = 0
    retried_stacks: int = 0
    seconds: float = 0.0


@dataclass
class TasksCache:
    """The tasks last built, keyed by every field they are built from (``DATA_FIELDS``: SLT,
    dataset, scenario, seed, padding, ...), kept so that the groups of one grid run in one
    process share them (building MNIST's tasks takes about 2 s). The inline executor keeps one
    for the whole grid; a worker process's job gets its own."""

    key: tuple[Any, ...] | None = None
    tasks: list[Task] = field(default_factory=list)

    def get(self, config: RunConfig, tasks_fn: TasksFn | None) -> list[Task]:
        """The tasks of ``config`` (``tasks_fn``, default :func:`masq.protocol.make_tasks`)."""
        fn = protocol.make_tasks if tasks_fn is None else tasks_fn
        key = (
            getattr(fn, "__module__", None),
            getattr(fn, "__qualname__", repr(fn)),
            *(getattr(config, name) for name in DATA_FIELDS),
        )
        if key != self.key:
            self.key, self.tasks = None, []  # drop the old tasks before building the new
            self.tasks, self.key = fn(config), key
        return self.tasks


def tasks_for(
    config: RunConfig, tasks_fn: TasksFn | None, cache: TasksCache | None = None
) -> list[Task]:
    """The tasks of ``config`` from ``cache`` (built when it holds others; no cache: built)."""
    return (cache or TasksCache()).get(config, tasks_fn)


def load_or_train_d1(store: Store, config: RunConfig, tasks: list[Task]) -> tuple[D1State, bool]:
    """The task-1 state of ``config`` from the store's cache, else trained (and cached)."""
    path = store.d1 / f"{d1_key(config)}.safetensors"
    saved = store.load_tensors(path)
    if saved is not None:
        adam = None
        if "adam_step" in saved:  # adam_state keep: Adam's moments after task 1
            adam = AdamMoments(
                int(saved["adam_step"]), saved["adam_exp_avg"], saved["adam_exp_avg_sq"]
            )
        state = D1State(
            config=RunConfig.from_dict(saved["config"]),
            state_dict=saved["state_dict"],
            curve=saved["curve"],
            seconds=float(saved["seconds"]),
            adam=adam,
        )
        return state, False
    state = protocol.train_first(config, tasks)
    payload = {
        "config": state.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in state.state_dict.items()},
        "curve": state.curve,
        "seconds": float(state.seconds),
    }
    if state.adam is not None:
        payload |= {
            "adam_step": state.adam.step,
            "adam_exp_avg": state.adam.exp_avg,
            "adam_exp_avg_sq": state.adam.exp_avg_sq,
        }
    _save_cache(store, path, payload)
    return state, True


def load_or_compute_importance(
    store: Store, config: RunConfig, d1: D1State, tasks: list[Task]
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """(importance, seconds, computed now?) of task 1 for ``config``, cached ({} where the
    run needs no pass: :func:`masq.grid.plan.needs_first_pass`)."""
    if not needs_first_pass(config):
        return {}, 0.0, False
    path = store.importance / f"{importance_key(config)}.safetensors"
    saved = store.load_tensors(path)
    if saved is not None:
        return saved["importance"], float(saved["seconds"]), False
    importance, seconds = protocol.compute_importance(config, d1, tasks)
    payload = {
        "config": config.to_dict(),
        "importance": {k: v.detach().cpu() for k, v in importance.items()},
        "seconds": float(seconds),
    }
    _save_cache(store, path, payload)
    return importance, float(seconds), True


def _save_cache(store: Store, path: Any, payload: dict[str, Any]) -> None:
    """Cache ``payload``; a failing write (disk full) is a warning, not a failed run."""
    try:
        store.save_tensors(path, payload)
    except OSError as err:
        warn(f"could not cache {path} ({error_text(err)}); it will be recomputed next time")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA out-of-memory error (a stack too large for the GPU)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "CUDA out of memory" in str(err)


def chunk_checkpoints(root: str, chunk: Sequence[RunConfig], stack: int) -> list[PhaseCheckpoint]:
    """The phase checkpoints of a chunk's runs (:mod:`masq.protocol.resume`), saved at most
    every :data:`CHECKPOINT_EVERY` seconds: one for a stack or runs trained alike, else one
    per run."""
    ids = [run_id(c) for c in chunk]
    together = placement(chunk[0], stack)[0] in ("stack", "alike")
    return [
        phase_checkpoint(Path(root), part, CHECKPOINT_EVERY, _resuming(len(part)))
        for part in ([ids] if together else [[i] for i in ids])
    ]


def _resuming(runs: int) -> Callable[[str], None]:
    """What a grid prints when ``runs`` runs resume from their phase checkpoint."""
    return lambda text: print(f"grid: {runs} run(s) {text}", file=sys.stderr, flush=True)


def _continue(
    chunk: list[RunConfig],
    d1: D1State | None,
    importances: dict[str, tuple[dict[str, torch.Tensor], float]],
    key_of: Callable[[RunConfig], str],
    tasks: list[Task],
    stack: int,
    points: Sequence[PhaseCheckpoint],
) -> list[protocol.Result]:
    """The records of one chunk (:func:`masq.grid.plan.chunks`, its runs of one
    :func:`~masq.grid.plan.placement`): runs alone from their own phase 1, runs trained alike
    through one phase loop, a stack, or one run; each resuming from its phase checkpoint
    (``points``, :func:`chunk_checkpoints`) where one was left."""
    kind, _ = placement(chunk[0], stack)
    if kind == "alone":
        return [
            protocol.run(c, tasks=tasks, keep_weights=False, checkpoint=point)
            for c, point in zip(chunk, points, strict=True)
        ]
    assert d1 is not None
    imps = [importances[key_of(c)] for c in chunk]
    if kind == "alike":
        return protocol.continue_runs(chunk, d1, imps, tasks, checkpoint=points[0])
    if kind == "stack":
        return protocol.continue_stacked(
            chunk, d1, [i for i, _ in imps], tasks, [s for _, s in imps], checkpoint=points[0]
        )
    return [
        protocol.continue_run(c, d1, imp, tasks, s, keep_weights=False, checkpoint=point)
        for c, (imp, s), point in zip(chunk, imps, points, strict=True)
    ]


def run_group(
    job: GroupJob,
    on_done: Callable[[int], None] | None = None,
    cache: TasksCache | None = None,
    on_progress: Callable[[Sequence[str], float, float], None] | None = None,
) -> GroupOutcome:
    """Run one group: task 1 (cached), its importance passes (cached), the runs in stacks.

    Runs already stored are skipped. Every finished run is written to the store as soon as
    its stack ends; a failure is recorded in DIR/errors for the runs it concerns (a failed
    task-1 training or importance pass fails every run that needs it) and never raised.
    ``on_done(n)`` is called after each stack with the number of runs it stored.
    ``on_progress(run ids, fraction, restored)`` every few seconds with how far the stack in
    flight is, and how much of that was restored from its phase checkpoint
    (:mod:`masq.grid.progress`); without it a pool worker writes that to DIR/progress (Ray
    workers, whose results come back with them, report nothing).
    """
    start = time.perf_counter()
    outcome = GroupOutcome()
    load_from_env()  # a pool or Ray worker: the modules of masq --plugin (imported once)
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    store = Store(job.root)
    todo = [c for c in job.configs if not store.has(run_id(c))]
    if not todo:
        return outcome

    def fail(configs: Iterable[RunConfig], err: BaseException) -> None:
        trace = "".join(tb.format_exception(type(err), err, err.__traceback__))
        for c in configs:
            rid = store.write_error(c, err)
            outcome.failed[rid] = f"{type(err).__name__}: {err}"
            outcome.traces[rid] = trace

    try:
        tasks = tasks_for(todo[0], job.tasks_fn, cache)
        shared = [c for c in todo if alone(c) is None]
        d1 = None
        if shared:
            d1, trained = load_or_train_d1(store, shared[0], tasks)
            outcome.d1_trained += int(trained)
    except Exception as err:  # recorded per run, reported at the end of the grid
        fail(todo, err)
        outcome.seconds = time.perf_counter() - start
        return outcome

    importances: dict[str, tuple[dict[str, torch.Tensor], float]] = {}

    def key_of(c: RunConfig) -> str:
        return importance_key(c) if needs_first_pass(c) else "none"

    runnable: list[RunConfig] = [c for c in todo if alone(c) is not None]
    for config in shared:
        assert d1 is not None
        key = key_of(config)
        if key not in importances:
            try:
                imp, seconds, computed = load_or_compute_importance(store, config, d1, tasks)
            except Exception as err:
                fail([c for c in todo if key_of(c) == key], err)
                importances[key] = ({}, math.nan)
                continue
            outcome.importance_computed += int(computed)
            importances[key] = (imp, seconds)
        if not math.isnan(importances[key][1]):
            runnable.append(config)

    report = on_progress  # where the chunk in flight reports; nothing in flight: report([], 0, 0)
    if report is None and not job.return_records:
        report = progress.file_reporter(job.root)
    queue = deque(chunks(runnable, max(1, job.stack)))
    while queue:
        chunk = queue.popleft()
        following: Any = contextlib.nullcontext()
        if report is not None:
            kind = placement(chunk[0], job.stack)[0]
            following = heartbeat.listening(progress.StepCounter(
                [run_id(c) for c in chunk], progress.expected_steps(chunk, kind), report
            ))  # fmt: skip
        points = chunk_checkpoints(job.root, chunk, job.stack)
        try:
            with following:
                results = _continue(chunk, d1, importances, key_of, tasks, job.stack, points)
        except Exception as err:  # (a stop, KeyboardInterrupt or SIGTERM, keeps the checkpoints)
            for point in points:
                point.clear()
            if is_out_of_memory(err) and len(chunk) > 1:
                torch.cuda.empty_cache()
                half = (len(chunk) + 1) // 2
                queue.extendleft([chunk[half:], chunk[:half]])
                outcome.retried_stacks += 1
                continue
            fail(chunk, err)
            continue
        finally:
            if report is not None:
                report([], 0.0, 0.0)  # stored below, or failed: either way no longer in flight
        stored = 0
        for result in results:
            try:
                rid = store.write_result(result)
            except NotStored as err:  # saved elsewhere (a warning said where); reported
                fail([result.config], err)
                continue
            outcome.done.append(rid)
            stored += 1
            if job.return_records:
                outcome.records[rid] = store.run_path(rid).read_text(encoding="utf-8")
        for point in points:
            point.clear()
        if on_done is not None:
            on_done(stored)
    outcome.seconds = time.perf_counter() - start
    return outcome
