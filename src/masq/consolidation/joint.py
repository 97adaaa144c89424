"""Joint training (``--consolidation joint``): the upper bound every continual-learning table
prints beside its methods (e.g. van de Ven & Tolias 2019, "Joint"; Zenke et al. 2017).

Phase t (t = 2..T) trains on the union of the training data of tasks 1..t, no penalty, no
importance:

    L_t(θ) = CE(θ; D_1 ∪ ... ∪ D_t),

its mini-batches drawn from the union by the phase's own stream (all tasks shuffled
together), at lr2 for iters2 iterations like every other method's phase t; phase 1 is
everyone's (task 1 alone). In the class and domain scenarios the union is the tasks' (x, y)
concatenated; in the task-incremental scenario each sample keeps its own task's output units
(the plan's ``train_tasks``: the loss of sample n masks the units of the other tasks,
:func:`masq.training.loop.unit_bias_rows`).

The measure does not enter: a joint run is canonicalised to ``importance = "none"`` (and every
method field, λ included, to its default), so runs that differ only there share one run id.
The union is built anew in every phase from the tasks (memory: the union's size in every
phase, T times task 1's at the end).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from masq.config import RunConfig
from masq.consolidation.registry import Method, PhaseContext, PhasePlan, register_method
from masq.errors import ConfigError
from masq.importance import Measure
from masq.tasks import XY, Task


def union_of(tasks: Sequence[Task], upto: int) -> tuple[XY, Tensor]:
    """((x, y), task index) of tasks 0..``upto`` (0-based, inclusive): their training data
    concatenated in task order, and int64 [N] naming each sample's task."""
    if not 0 <= upto < len(tasks):
        raise ConfigError(f"joint: no task {upto + 1} among {len(tasks)}; check the phase")
    parts = [tasks[j].train for j in range(upto + 1)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    index = torch.cat(
        [torch.full((p[0].shape[0],), j, dtype=torch.int64) for j, p in enumerate(parts)]
    )
    return (x, y), index


class Joint(Method):
    """Joint training on every task seen so far (module docstring)."""

    name = "joint"
    family = "joint"
    fields = ()
    stackable = False
    description = "phase t trains on the union of tasks 1..t (the upper bound), no penalty"

    def label(self, values: Mapping[str, Any], measure: Measure, detailed: bool) -> str:
        return "joint"

    def canonical(self, config: RunConfig) -> dict[str, Any]:
        return {"importance": "none"}  # λ and the other method fields: unread, so defaults

    def wants_importance(self, config: RunConfig, phase: int) -> bool:
        return False

    def before_phase(
        self, config: RunConfig, state: Any, model: nn.Module, phase: int, ctx: PhaseContext
    ) -> PhasePlan:
        train, index = union_of(ctx.tasks, phase)
        return PhasePlan(train=train, train_tasks=index)


JOINT = register_method(Joint())

__all__ = ["JOINT", "Joint", "union_of"]
