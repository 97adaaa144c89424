"""Doing the work once: runs that share task 1's state form a :class:`Group`.

Runs that agree on the fields of :data:`masq.config.FIRST_FIELDS` start from the same state
after phase 1; each group trains it once and computes each importance of task 1 (the fields
of :data:`masq.config.IMPORTANCE_FIELDS`) once. The later phases of a group's runs are
trained K at a time as one stacked model where the stacked engine takes them (:func:`chunks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from masq.config import FIRST_FIELDS, IMPORTANCE_FIELDS, RunConfig, n_params
from masq.consolidation import get_method
from masq.importance import get_measure
from masq.protocol import stackable
from masq.runid import d1_key, id_dict, key_of

T = TypeVar("T")


def importance_key(config: RunConfig) -> str:
    """The cache key of task 1's importance: a hash of ``FIRST_FIELDS + IMPORTANCE_FIELDS``
    and, for a measure whose stored layout changed (``Measure.layout`` > 1), that version."""
    d = id_dict(config)
    key = {name: d[name] for name in (*FIRST_FIELDS, *IMPORTANCE_FIELDS) if name in d}
    layout = get_measure(config.importance).layout
    return key_of(key if layout == 1 else {**key, "layout": layout})


@dataclass(frozen=True)
class Group:
    """The runs that start from one task-1 state (same ``FIRST_FIELDS``)."""

    key: str
    configs: tuple[RunConfig, ...]

    @property
    def importance_keys(self) -> list[str]:
        """The distinct task-1 importance passes this group needs (runs whose method takes
        none, or whose measure gives none, need none)."""
        keys = [importance_key(c) for c in self.configs if needs_first_pass(c)]
        return list(dict.fromkeys(keys))


def needs_first_pass(config: RunConfig) -> bool:
    """Whether ``config`` needs a pass over task 1's data after phase 1: its method takes
    task 1's importance and its measure is computed after a phase."""
    method, measure = get_method(config.consolidation), get_measure(config.importance)
    return method.wants_importance(config, 0) and measure.compute is not None


def alone(config: RunConfig) -> str | None:
    """Why ``config`` runs on its own through :func:`masq.protocol.run` (no shared task-1
    state), or None: a measure accumulated during training needs its own phase 1."""
    if get_measure(config.importance).tracker is not None:
        return f"importance {config.importance!r} accumulates during its own task-1 training"
    return None


def plan(configs: Sequence[RunConfig]) -> list[Group]:
    """``configs`` grouped by task-1 state, in order of first appearance."""
    groups: dict[str, list[RunConfig]] = {}
    for config in configs:
        groups.setdefault(d1_key(config), []).append(config)
    return [Group(key, tuple(cs)) for key, cs in groups.items()]


@dataclass(frozen=True)
class Work:
    """What a list of runs costs in shared units."""

    runs: int
    d1_trainings: int
    importance_passes: int
    later_runs: int
    stacks: int  # the chunks a worker runs at once (:func:`chunks`), one-run chunks included
    one_by_one: int = 0  # the runs that go alone (no stack, no shared training)

    def text(self, stack: int) -> str:
        """The shared work in words, e.g. "4 task-1 trainings, 8 importance passes, 24 runs
        in 4 stacks of <= 16" (", of which 3 one by one" where some runs go alone)."""
        alone = f", of which {self.one_by_one} one by one" if self.one_by_one else ""
        return (
            f"{self.d1_trainings} task-1 trainings, {self.importance_passes} importance passes, "
            f"{self.later_runs} runs in {self.stacks} stacks of <= {stack}{alone}"
        )


def work(groups: Sequence[Group], stack: int) -> Work:
    """The counts of task-1 trainings, importance passes, runs, stacks and runs that go one
    by one (:func:`placement` "alone" or "single") of ``groups``."""
    parts = [c for g in groups for c in chunks(g.configs, stack)]
    alone = sum(1 for c in parts if placement(c[0], stack)[0] in ("alone", "single"))
    runs = sum(len(g.configs) for g in groups)
    passes = sum(len(g.importance_keys) for g in groups)
    return Work(runs, len(groups), passes, runs, len(parts), alone)


def placement(config: RunConfig, stack: int) -> tuple[str, Any]:
    """How a worker runs ``config``, with what decides it: ("alone", why) from its own phase
    1 (:func:`alone`); ("alike", training key) with the runs whose phases train alike
    (:meth:`~masq.consolidation.Method.shared_training`); ("stack", (tasks, iters2)) in a stack
    of the stacked engine (:func:`masq.protocol.stackable`); else ("single", why not stacked)."""
    why = alone(config)
    if why is not None:
        return "alone", why
    shared = get_method(config.consolidation).shared_training(config)
    if shared is not None:
        return "alike", shared
    why = stackable(config) if stack > 1 else "--stack 1"
    return ("stack", (config.n_tasks, config.iters2)) if why is None else ("single", why)


def chunks(configs: Sequence[RunConfig], stack: int) -> list[list[RunConfig]]:
    """The runs of one group cut into the units a worker runs at once (:func:`placement`):
    stacks of at most ``stack`` runs with equal numbers of tasks and ``iters2``; the runs that
    train alike as one chunk, trained once; every other run alone (a chunk of one)."""
    by_iters: dict[tuple[int, int], list[RunConfig]] = {}
    singles: list[list[RunConfig]] = []
    by_training: dict[tuple[Any, ...], list[RunConfig]] = {}
    for config in configs:
        kind, key = placement(config, stack)
        if kind == "alike":
            by_training.setdefault(key, []).append(config)
        elif kind == "stack":
            by_iters.setdefault(key, []).append(config)
        else:
            singles.append([config])
    out: list[list[RunConfig]] = []
    for cs in by_iters.values():
        out += [cs[i : i + stack] for i in range(0, len(cs), stack)]
    return out + singles + list(by_training.values())


def job_weight(configs: Sequence[RunConfig]) -> float:
    """An arithmetic proxy of what running ``configs`` costs, to start the largest job first:
    with P the network's parameter count and B its batch size (a step's multiply-adds are
    ∝ B·P),

        w = Σ_{task-1 states} iters1·B·P + Σ_{runs} (T − 1)·iters2·B·P.

    Only the order of jobs is read from it (:func:`spread`), never a time."""
    states = {d1_key(c): c.iters1 * c.batch_size * n_params(c.hidden) for c in configs}
    later = sum((c.n_tasks - 1) * c.iters2 * c.batch_size * n_params(c.hidden) for c in configs)
    return float(sum(states.values()) + later)


def cut(parts: list[list[T]], workers: int) -> list[list[T]]:
    """The part with the most items cut in two, its items dealt alternately, while there are
    fewer parts than ``workers`` or, on several workers, while it holds more than
    1/(2·``workers``) of all items: then no part is long enough to run alone at the end while
    other workers idle (a grid of three groups of 16 runs on two workers ran its last group
    on one). The second half goes to the end of the list, so that a group's first part
    starts before its second, which then loads the group's task-1 state and importance from
    the cache. A part of one item is never cut."""
    parts = list(parts)
    total = sum(len(p) for p in parts)
    while parts:
        i = max(range(len(parts)), key=lambda j: len(parts[j]))
        n = len(parts[i])
        if n < 2 or (len(parts) >= workers and (workers < 2 or 2 * workers * n <= total)):
            break
        parts[i], second = parts[i][0::2], parts[i][1::2]
        parts.append(second)
    return parts


def longest_first(jobs: Sequence[tuple[RunConfig, ...]]) -> list[tuple[RunConfig, ...]]:
    """``jobs`` by :func:`job_weight`, largest first (stable: equal weights keep their order).
    On ``W`` workers, taking the largest first bounds the wall time by 4/3 of the best
    possible (Graham's LPT rule), where the order of appearance can leave the largest job to
    run alone at the end."""
    return sorted(jobs, key=job_weight, reverse=True)


def own_parts(group_chunks: Sequence[T], alone_chunk: Callable[[T], bool]) -> list[list[T]]:
    """A group's chunks as the parts of jobs: the chunks that share nothing with their group
    (``alone_chunk``: a run that trains its own task 1, :func:`alone`) one part each, so that a
    free worker takes them while another trains the group's stacks; the other chunks, which
    share the group's task-1 state and importance, one part."""
    together = [c for c in group_chunks if not alone_chunk(c)]
    return ([together] if together else []) + [[c] for c in group_chunks if alone_chunk(c)]


def spread(
    groups: Sequence[Group], workers: int, stack: int, order: bool = False
) -> list[tuple[RunConfig, ...]]:
    """The runs of each job of a grid on ``workers`` workers: one group per job, but each run
    that trains its own task 1 a job of its own (:func:`own_parts`); and while there are fewer
    jobs than workers, or one holds more than 1/(2·workers) of the chunks (:func:`chunks`),
    the job with the most is cut in two (:func:`cut`), so that no worker idles. The parts of
    a group each load its task-1 state and importance from the cache or compute them
    (deterministic, written atomically: at worst computed once per part); a stack is never
    cut. ``order``: the jobs largest first (:func:`longest_first`), else in order of
    appearance."""
    parts = cut(
        [
            part
            for g in groups
            for part in own_parts(chunks(g.configs, stack), lambda c: alone(c[0]) is not None)
        ],
        workers,
    )
    jobs = [tuple(c for chunk in part for c in chunk) for part in parts]
    return longest_first(jobs) if order else jobs


def one_by_one(configs: Sequence[RunConfig], stack: int = 16) -> dict[str, int]:
    """{reason: number of runs} of the runs of ``configs`` that are neither stacked nor
    trained together with others (the line a grid prints about them)."""
    out: dict[str, int] = {}
    for config in configs:
        kind, why = placement(config, stack)
        if kind in ("alone", "single"):
            out[why] = out.get(why, 0) + 1
    return out


def worker_seconds(runs: Sequence[tuple[RunConfig, Mapping[str, Sequence[float]]]]) -> float:
    """The worker time that ``runs`` (config, the ``timings`` of its record) took together, in
    seconds, counting what :func:`plan` shares once:

        Σ_runs ( Σ_{t≥2} train_t + Σ_{passes after task 2..} importance + Σ other timings )
          + Σ_{distinct d1_key} train_1 + Σ_{distinct importance_key} importance_1

    where train_t is the record's time of phase t (a stacked run's share: the stack's time
    / K, so a stack's runs sum to its time) and importance_1 the pass over task 1's data. A
    run that trains its own task 1 (:func:`alone`) counts its train_1 and importance_1 itself.
    Every run records the task-1 time of the state it started from, so a plain sum counts a
    shared task 1 once per run."""
    own = 0.0
    first: dict[str, float] = {}
    first_pass: dict[str, float] = {}
    for config, timings in runs:
        train = [float(s) for s in timings.get("train", ())]
        passes = [float(s) for s in timings.get("importance", ())]
        own += sum(float(s) for key, v in timings.items() if key not in ("train", "importance")
                   for s in v)  # fmt: skip
        if alone(config) is not None:
            own += sum(train) + sum(passes)
            continue
        own += sum(train[1:])
        if train:
            first[d1_key(config)] = train[0]
        if passes and needs_first_pass(config):
            first_pass[importance_key(config)] = passes[0]
            passes = passes[1:]
        own += sum(passes)
    return own + sum(first.values()) + sum(first_pass.values())


def makespan(
    parts: Sequence[Sequence[tuple[tuple[RunConfig, ...], float]]],
    shared: Sequence[tuple[float, float]],
    workers: int,
) -> float:
    """The wall time of the jobs the executor makes of ``parts`` (per group its chunks with
    their seconds; :func:`masq.grid.plan.spread`), taken largest first
    (:func:`longest_first`) by the first free worker: a run that trains its own
    task 1 is a job of its own and pays a task-1 training (its group's ``shared[g][0]``
    seconds); a part of a group cut (:func:`cut`) pays the group's task-1
    training and importance passes (``shared[g]``) unless it starts after another part has
    cached them. The time at which the last worker finishes."""

    def own(x: tuple[int, tuple[RunConfig, ...], float]) -> bool:
        return alone(x[1][0]) is not None

    owned = [
        part
        for g, group in enumerate(parts)
        for part in own_parts([(g, *chunk) for chunk in group], own)
    ]
    jobs = [(sum(s for _, _, s in p), tuple(x for _, c, _ in p for x in c), p[0][0], own(p[0]))
            for p in cut(owned, workers) if p]  # fmt: skip
    if workers > 1:
        jobs.sort(key=lambda job: job_weight(job[1]), reverse=True)
    free = [0.0] * max(1, workers)
    cached: dict[int, float] = {}  # group -> when its task-1 state and importance are cached
    for seconds, _, g, alone_ in jobs:
        i = min(range(len(free)), key=free.__getitem__)
        start, first = free[i], shared[g][0] if alone_ else sum(shared[g])
        if not alone_:
            first = first if start < cached.get(g, float("inf")) else 0.0
            cached[g] = min(cached.get(g, float("inf")), start + first)
        free[i] = start + first + seconds
    return max(free)
