"""Progress within a chunk: how far the stacks in flight are, for the grid's bar and its ETA.

A grid stores a chunk's runs (a stack, or one run) when the chunk ends; a stack of 10 permuted
MNIST tasks trains for most of an hour first. So the worker running a chunk counts the
optimizer steps its training loops take (:mod:`masq.training.heartbeat`) against the steps the
chunk needs (:func:`expected_steps`), and reports the fraction f: to a callback in the same
process, or every few seconds to a small file DIR/progress/<pid>.json that the grid's parent
reads (:func:`in_flight`). The bar then stands at stored + Σ f·(runs of the chunk), and tqdm's
rate and ETA follow from it; the steps of a chunk resumed from its phase checkpoint are
reported apart (restored), shown on the bar but left out of its rate. The fraction counts
steps only: evaluation and importance passes between phases move it not at all, so it is held
below 1 until the chunk's runs are stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from masq.config import RunConfig
from masq.fileio import atomic_write

PROGRESS_DIR = "progress"
WRITE_EVERY = 5.0  # seconds between two writes of a worker's progress file
HELD_BELOW = 0.99  # a chunk's fraction before its runs are stored


def expected_steps(chunk: Sequence[RunConfig], kind: str) -> int:
    """The optimizer steps one chunk of :func:`masq.grid.plan.chunks` takes: for a stack or
    runs trained alike (one loop for all), (T − 1)·iters2 once; for runs one by one, that per
    run; for runs alone (from their own phase 1), iters1 + (T − 1)·iters2 per run."""
    if not chunk:
        return 0

    def later(c: RunConfig) -> int:
        return (c.n_tasks - 1) * c.iters2

    if kind in ("stack", "alike"):
        return later(chunk[0])
    if kind == "alone":
        return sum(c.iters1 + later(c) for c in chunk)
    return sum(later(c) for c in chunk)


Report = Callable[[Sequence[str], float, float], None]  # (run ids, fraction, restored)


class StepCounter:
    """The heartbeat listener of one chunk of ``runs`` run ids needing ``total`` steps: every
    ``every`` seconds (default :data:`WRITE_EVERY`) it passes ``report(runs, fraction,
    restored)``, both held in [0, :data:`HELD_BELOW`]: the steps counted so far, and those of
    them restored from a phase checkpoint (reported at once: a bar leaves them out of its
    rate)."""

    def __init__(
        self,
        runs: Sequence[str],
        total: int,
        report: Report,
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runs, self.total, self.report = tuple(runs), max(1, int(total)), report
        self.every = WRITE_EVERY if every is None else every
        self.clock = clock
        self.steps = 0
        self.restored_steps = 0
        self._last = clock()

    @property
    def fraction(self) -> float:
        """steps / total, held below :data:`HELD_BELOW`."""
        return min(self.steps / self.total, HELD_BELOW)

    @property
    def restored_fraction(self) -> float:
        """restored steps / total, held below :data:`HELD_BELOW`."""
        return min(self.restored_steps / self.total, HELD_BELOW)

    def __call__(self, steps: int) -> None:
        self.steps += steps
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            self.report(self.runs, self.fraction, self.restored_fraction)

    def restored(self, steps: int) -> None:
        """``steps`` steps restored from a phase checkpoint
        (:func:`masq.training.heartbeat.restored`), reported at once."""
        self.steps += steps
        self.restored_steps += steps
        self._last = self.clock()
        self.report(self.runs, self.fraction, self.restored_fraction)


def progress_file(root: str | os.PathLike[str], pid: int | None = None) -> Path:
    """DIR/progress/<pid>.json: the progress of the chunk worker ``pid`` (default: this
    process) is running."""
    return Path(root) / PROGRESS_DIR / f"{os.getpid() if pid is None else pid}.json"


def file_reporter(root: str | os.PathLike[str]) -> Report:
    """A report for :class:`StepCounter` that writes {"runs": [...], "fraction": f,
    "restored": r} to this process's :func:`progress_file` (atomically; a failed write only
    costs the display); no runs (nothing in flight) removes the file."""
    path = progress_file(root)

    def report(runs: Sequence[str], fraction: float, restored: float = 0.0) -> None:
        if not runs:
            clear(root)
            return
        body = {"runs": list(runs), "fraction": fraction, "restored": restored}
        with contextlib.suppress(OSError):
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, json.dumps(body))

    return report


def clear(root: str | os.PathLike[str], pid: int | None = None) -> None:
    """Remove the progress file of ``pid`` (default: this process), or with ``pid`` -1 every
    one (a grid starting: files of workers killed earlier)."""
    folder = Path(root) / PROGRESS_DIR
    paths = folder.glob("*.json") if pid == -1 else [progress_file(root, pid)]
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


class InFlight(NamedTuple):
    """The chunks in flight: their work done, in runs, and per chunk (its run ids joined by
    commas) the part of it restored from phase checkpoints."""

    work: float
    restored: dict[str, float]


def in_flight(root: str | os.PathLike[str], stored: Iterable[str]) -> InFlight:
    """Σ over the progress files under ``root`` of fraction × (their runs not in ``stored``):
    how many runs' worth of work the chunks in flight have done; and per chunk, restored ×
    the same runs. Unreadable files count 0."""
    held = set(stored)
    total = 0.0
    restored: dict[str, float] = {}
    for path in sorted((Path(root) / PROGRESS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            runs, fraction = list(data["runs"]), float(data["fraction"])
            back = float(data.get("restored", 0.0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        pending = sum(1 for rid in runs if rid not in held)
        total += min(max(fraction, 0.0), HELD_BELOW) * pending
        restored[",".join(map(str, runs))] = min(max(back, 0.0), HELD_BELOW) * pending
    return InFlight(total, restored)


BAR_FORMAT = "{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class GridBar:
    """A grid's progress bar: runs stored plus the fraction done of the stacks in flight, so
    the bar and its ETA move while a long stack trains.

    Work restored from phase checkpoints (runs resumed, :class:`InFlight`) was done before
    this grid started: the bar shows it but leaves it out of its rate and ETA, as it leaves
    out the runs stored before. ``restored`` keeps the largest such work seen per chunk (its
    run ids joined by commas) over the grid, so a chunk stored meanwhile still counts it.
    """

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.tqdm: Any = tqdm(
            total=total,
            initial=initial,
            desc="grid",
            unit="run",
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0.05,
            bar_format=BAR_FORMAT,
        )
        self.restored: dict[str, float] = {}
        self.shown = 0.0  # the restored work already added to the bar

    @property
    def n(self) -> float:
        """Where the bar stands, in runs."""
        return float(self.tqdm.n)

    def move(self, runs: float, restored: Mapping[str, float] | None = None) -> None:
        """Move up to ``runs`` (stored runs plus the fractions in flight); never back (a
        stack's fraction ends where its runs are stored). ``restored``: one reading of the
        chunks' restored work (:attr:`InFlight.restored`), Σ max per chunk over the grid
        added to tqdm's ``n`` and ``initial`` outside its rate."""
        for key, value in (restored or {}).items():
            self.restored[key] = max(self.restored.get(key, 0.0), value)
        extra = sum(self.restored.values()) - self.shown
        bar = self.tqdm
        if extra > 1e-9 and not getattr(bar, "disable", False):
            self.shown += extra
            bar.n += extra  # no update(): tqdm's rate would count it as work done now
            bar.initial += extra
            bar.last_print_n += extra
        if runs > bar.n + 1e-9:
            if not getattr(bar, "disable", False) and bar.n <= bar.initial + 1e-9:
                # the grid's first step (the bar still where it started, restored work aside)
                # comes after loading and task-1 work that steps do not count: its wait would
                # seed tqdm's smoothed rate with hours per run (an ETA of hundreds of hours for
                # minutes), so the rate starts from here, not elapsed
                bar.last_print_t = bar._time()
            bar.update(runs - bar.n)

    def close(self) -> None:
        """Close the bar (its last line stays)."""
        self.tqdm.close()
