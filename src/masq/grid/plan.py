"""Doing the work once: runs that share task 1's state form a :class:`Group`.

Runs that agree on the fields of :data:`masq.config.FIRST_FIELDS` start from the same state
after phase 1; each group trains it once and computes each importance of task 1 (the fields
of :data:`masq.config.IMPORTANCE_FIELDS`) once. The later phases of a group's two-task runs
are trained K at a time as one stacked model (:func:`chunks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from masq.config import FIRST_FIELDS, IMM_METHODS, IMPORTANCE_FIELDS, ImportanceKind, RunConfig
from masq.protocol.imm import training_key as imm_training_key
from masq.runid import id_dict, key_of


def d1_key(config: RunConfig) -> str:
    """The cache key of a task-1 state: a hash of the ``FIRST_FIELDS`` of ``config`` (those
    added since store format 1 only where they differ from their defaults, as in run ids)."""
    d = id_dict(config)
    return key_of({name: d[name] for name in FIRST_FIELDS if name in d})


def importance_key(config: RunConfig) -> str:
    """The cache key of task 1's importance: a hash of ``FIRST_FIELDS + IMPORTANCE_FIELDS``."""
    d = id_dict(config)
    return key_of({name: d[name] for name in (*FIRST_FIELDS, *IMPORTANCE_FIELDS) if name in d})


@dataclass(frozen=True)
class Group:
    """The runs that start from one task-1 state (same ``FIRST_FIELDS``)."""

    key: str
    configs: tuple[RunConfig, ...]

    @property
    def importance_keys(self) -> list[str]:
        """The distinct importance passes this group needs (λ = 0 runs need none)."""
        keys = [importance_key(c) for c in self.configs if c.importance != ImportanceKind.NONE]
        return list(dict.fromkeys(keys))


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
    stacks: int


def work(groups: Sequence[Group], stack: int) -> Work:
    """The counts of task-1 trainings, importance passes, runs and stacks of ``groups``."""
    stacks = sum(len(chunks(g.configs, stack)) for g in groups)
    runs = sum(len(g.configs) for g in groups)
    passes = sum(len(g.importance_keys) for g in groups)
    return Work(runs, len(groups), passes, runs, stacks)


def chunks(configs: Sequence[RunConfig], stack: int) -> list[list[RunConfig]]:
    """The runs of one group cut into stacks of at most ``stack`` with equal ``iters2``; runs
    of more than two tasks go one by one (stacks of 1). IMM runs are never stacked: they go
    one by one, except that the runs whose later phases are trained alike (mean-IMM and
    mode-IMM with any importance: :func:`masq.protocol.imm.training_key`) form one chunk,
    which trains them once and merges each."""
    by_iters: dict[int, list[RunConfig]] = {}
    singles: list[list[RunConfig]] = []
    by_training: dict[tuple[Any, ...], list[RunConfig]] = {}
    for config in configs:
        if config.consolidation in IMM_METHODS:
            by_training.setdefault(imm_training_key(config), []).append(config)
        elif config.n_tasks > 2:
            singles.append([config])
        else:
            by_iters.setdefault(config.iters2, []).append(config)
    out: list[list[RunConfig]] = []
    for cs in by_iters.values():
        out += [cs[i : i + stack] for i in range(0, len(cs), stack)]
    return out + singles + list(by_training.values())
