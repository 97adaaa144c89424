"""Exhaustive grid search (the paper's §5.1): grids, shared work, executors, estimates.

Rooms: :mod:`~masq.grid.spec` (Grid, TOML files, presets), :mod:`~masq.grid.expand` (the
product of the axes, canonical configs), :mod:`~masq.grid.plan` (groups that share task 1's
state and importance), :mod:`~masq.grid.group` (one group's work, cached and resumable),
:mod:`~masq.grid.executors` (local pool, Ray, progress, fail-fast), :mod:`~masq.grid.estimate`
(the ``--dry-run`` time estimate).
"""

from masq.consolidation import canonical
from masq.grid.estimate import Estimate, calibrate, estimate, measure, task_sizes
from masq.grid.executors import GridAborted, GridStopped, Summary, execute
from masq.grid.expand import expand, lam_values
from masq.grid.group import (
    GroupJob,
    GroupOutcome,
    TasksCache,
    load_or_compute_importance,
    load_or_train_d1,
    run_group,
    tasks_for,
)
from masq.grid.plan import Group, Work, chunks, importance_key, plan, work
from masq.grid.plan import spread as plan_spread
from masq.grid.spec import (
    GRID_KEYS,
    Grid,
    architectures,
    grid_from_mapping,
    list_presets,
    load_grid_file,
    load_preset,
    read_toml,
)
from masq.runid import d1_key
from masq.runtime import cpu_count

__all__ = [
    "GRID_KEYS",
    "Estimate",
    "Grid",
    "GridAborted",
    "GridStopped",
    "Group",
    "GroupJob",
    "GroupOutcome",
    "Summary",
    "TasksCache",
    "Work",
    "architectures",
    "calibrate",
    "canonical",
    "chunks",
    "cpu_count",
    "d1_key",
    "estimate",
    "execute",
    "expand",
    "grid_from_mapping",
    "importance_key",
    "lam_values",
    "list_presets",
    "load_grid_file",
    "load_or_compute_importance",
    "load_or_train_d1",
    "load_preset",
    "measure",
    "plan",
    "plan_spread",
    "read_toml",
    "run_group",
    "task_sizes",
    "tasks_for",
    "work",
]
