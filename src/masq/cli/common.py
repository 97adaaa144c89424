"""What the grid-running commands (``masq grid``, ``masq consistency``, ``masq analyze
lambda``, ``masq table1``) share: the check of counts, workers and threads, the task builder of
``--data-dir``, the dry-run report and the execution that turns an aborted grid into one
line. (Their flags: :func:`masq.cli.options.add_execution_flags`.)"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from masq.errors import ConfigError


def at_least_one(*flags: tuple[str, int]) -> None:
    """A one-line ConfigError for the first (flag, value) whose value is below 1."""
    for flag, value in flags:
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")


def resolve_workers(
    workers: int | None, threads: int | None, device: str | None = None
) -> tuple[int, int]:
    """(workers, threads per worker): ``workers`` defaults to the cores (one per GPU for a
    CUDA ``device``), ``threads`` (None) to cores // workers (at least 1); either given < 1
    (``--threads 0`` included) is a one-line ConfigError."""
    from masq.runtime import cpu_count, default_threads

    n = cpu_count() if workers is None else workers
    if workers is None and str(device or "").startswith("cuda"):
        import torch

        n = max(1, torch.cuda.device_count())  # one worker per GPU
    at_least_one(("--workers", n))
    if threads is not None:
        at_least_one(("--threads", threads))
    return n, default_threads(n) if threads is None else threads


def tasks_fn(data_dir: str | None) -> Any:
    """The task builder reading the IDX files of ``--data-dir`` (None: the default)."""
    if not data_dir:
        return None
    from masq import protocol

    return functools.partial(protocol.make_tasks, data_dir=data_dir)


def hours(seconds: float) -> str:
    """A duration as "42 s", "3.5 min" or "2.10 h"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def plan_lines(
    configs: Sequence[Any],
    stored: set[str],
    *,
    stack: int,
    workers: int,
    threads: int,
    label: str = "",
) -> tuple[list[str], float]:
    """The dry-run report of running ``configs`` when ``stored`` ids are done: counts, the
    shared work, and (when something is left) a time estimate from a short calibration on
    this machine. Returns (lines, estimated seconds)."""
    from masq import grid as search
    from masq.runid import run_id

    todo = [c for c in configs if run_id(c) not in stored]
    groups = search.plan(todo)
    w = search.work(groups, stack)
    lines = [
        f"{label}stored already: {len(configs) - len(todo)}; to run: {len(todo)}",
        f"shared work: {w.text(stack)}",
    ]
    if not todo:
        return lines, 0.0
    est = search.estimate(groups, stack, workers=workers, threads=threads)
    measured = ", ".join("-".join(map(str, widths)) for widths in est.measured)
    share = est.evaluation / est.total if est.total > 0 else 0.0
    lines += [
        f"calibration: a few iterations of {measured} on this machine ({len(est.measured)} of "
        f"{est.architectures} architectures measured, others interpolated by parameter count)",
        f"estimated time with {workers} worker(s) x {threads} thread(s): {hours(est.total)} "
        f"(task-1 training {hours(est.d1)}, importance {hours(est.importance)}, re-training "
        f"{hours(est.d2)}; evaluation {100 * share:.0f}% of it)",
    ]
    return lines, est.total


def stored_ids(results: str | os.PathLike[str] | None) -> set[str]:
    """The ids of the runs stored validly in results dir ``results`` (none when it holds no
    results yet), read without writing: a dry run creates nothing and sets no invalid record
    aside. A results dir of another format or a foreign one is a one-line ConfigError."""
    from masq.store import Store

    if results is None or not holds_results(results):
        return set()
    return Store(results, create=False).stored_ids(repair=False)


def holds_results(results: str | os.PathLike[str] | None) -> bool:
    """Whether ``results`` is a results dir that holds runs (or did): a missing or empty
    directory is where a grid will start one, which a dry run reads as no runs stored."""
    if results is None:
        return False
    root = Path(results)
    return (root / "meta.json").exists() or (root / "runs").exists()


def print_plan(
    configs: Sequence[Any],
    results: str | os.PathLike[str] | None,
    *,
    stack: int,
    workers: int,
    threads: int,
    label: str = "",
) -> float:
    """The dry run of every grid-running command: prints :func:`plan_lines` of ``configs``
    against the runs stored in ``results`` (:func:`stored_ids`); returns the estimated
    seconds."""
    lines, seconds = plan_lines(
        configs, stored_ids(results), stack=stack, workers=workers, threads=threads, label=label
    )
    print("\n".join(lines), flush=True)
    return seconds


def done_text(summary: Any) -> str:
    """ "done: 3 runs now, 5 were stored, 0 failed" of a grid's summary."""
    return (
        f"done: {summary.done} runs now, {summary.skipped} were stored, "
        f"{len(summary.failed)} failed"
    )


def print_failed(
    failed: Mapping[str, str], results: str | os.PathLike[str], limit: int = 10
) -> None:
    """The runs of a grid that failed, on stderr: where their tracebacks are, then the first
    ``limit`` as "  RUN_ID: message" and how many more."""
    print(f"failed runs (details in {Path(results) / 'errors'}):", file=sys.stderr)
    for rid, message in list(failed.items())[:limit]:
        print(f"  {rid}: {message}", file=sys.stderr)
    if len(failed) > limit:
        print(f"  ... and {len(failed) - limit} more", file=sys.stderr)


def execute(command: str, configs: Sequence[Any], root: Any, **kwargs: Any) -> Any:
    """:func:`masq.grid.execute`; a grid aborted by a failure that would fail every run
    prints that run's traceback and one line, "masq COMMAND: ...", and gives None."""
    from masq import grid as search

    try:
        return search.execute(list(configs), root, **kwargs)
    except search.GridAborted as err:
        print(err.traceback, file=sys.stderr, end="")
        print(f"masq {command}: {err}", file=sys.stderr)
        return None


__all__ = [
    "at_least_one",
    "done_text",
    "execute",
    "hours",
    "plan_lines",
    "print_failed",
    "print_plan",
    "resolve_workers",
    "stored_ids",
    "tasks_fn",
]
