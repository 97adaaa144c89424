"""The three scenarios of continual learning (van de Ven & Tolias 2019, "Three scenarios for
continual learning"): what the network is told and asked.

- ``class`` (class-incremental, the MaSQ paper's setting): one head over all classes; the
  task identity is never given. The tasks are used as they are.
- ``task`` (task-incremental): the task identity is given at training and at test, and each
  task has its own output units; the others' logits are masked (−inf), so training and the
  argmax see only the task's own. With disjoint classes (split MNIST) a task's units are its
  classes: this is the multi-head setting of van de Ven & Tolias (the shared layer's rows of
  the other tasks are inactive) with no extra parameters and the same network as ``class``.
  With overlapping classes (permuted MNIST: every task has 0..9) task t gets its own block of
  C units, label y -> t·C + y, and the head grows to T·C units.
- ``domain`` (domain-incremental): every task maps onto one shared label set: class
  ``classes[i]`` of a task becomes label i (split MNIST 0/1, 2/3, ... -> "first or second
  digit of the task", a 2-way head; permuted MNIST keeps its 10 classes).
- ``class-blocks`` (class-incremental as van de Ven & Tolias define it for tasks that share
  their classes): every task's classes are new classes, with no task identity. Task t's
  label y becomes t·C + y and every unit of the T·C-unit head stays active (permuted MNIST:
  100 units, the network must tell the permutations apart). With disjoint classes (split
  MNIST) it is ``class``.

Relabelling is pure and applies to the train, validation and test parts alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from masq.config import Scenario, choice
from masq.errors import ConfigError
from masq.tasks import XY, Task


def _relabel(xy: XY, lookup: Tensor) -> XY:
    """(x, lookup[y]): the same images with every label mapped through ``lookup``."""
    x, y = xy
    return x, lookup[y]


def _mapped(task: Task, labels: Sequence[int], units: Sequence[int] | None) -> Task:
    """``task`` with class ``classes[i]`` relabelled ``labels[i]`` in every part."""
    lookup = torch.full((max(task.classes) + 1,), -1, dtype=torch.int64)
    lookup[list(task.classes)] = torch.as_tensor(list(labels), dtype=torch.int64)
    return dataclasses.replace(
        task,
        train=_relabel(task.train, lookup),
        val=_relabel(task.val, lookup),
        test=_relabel(task.test, lookup),
        labels=tuple(int(v) for v in labels),
        units=None if units is None else tuple(int(u) for u in units),
    )


def disjoint(tasks: Sequence[Task]) -> bool:
    """Whether no class belongs to two tasks (split MNIST; permuted MNIST is not)."""
    seen: set[int] = set()
    for task in tasks:
        if seen & set(task.classes):
            return False
        seen |= set(task.classes)
    return True


def apply_scenario(tasks: Sequence[Task], scenario: Scenario | str) -> list[Task]:
    """The tasks of ``scenario`` (module docstring): unchanged for ``class``; for ``task`` each
    task's units (its classes, or its own block of C units when classes overlap); for
    ``domain`` every task relabelled onto 0..k−1 by the position of its classes; for
    ``class-blocks`` overlapping classes relabelled into one block of C labels per task, every
    unit active."""
    kind = choice(Scenario, scenario, "scenario")
    if kind == Scenario.CLASS or not tasks:
        return list(tasks)
    if kind == Scenario.DOMAIN:
        return [_mapped(t, range(len(t.classes)), None) for t in tasks]
    masked = kind == Scenario.TASK
    if disjoint(tasks):
        return [_mapped(t, t.classes, t.classes) for t in tasks] if masked else list(tasks)
    width = max(max(t.classes) for t in tasks) + 1
    out = []
    for i, t in enumerate(tasks):
        units = [i * width + c for c in t.classes]
        out.append(_mapped(t, units, units if masked else None))
    return out


def n_outputs(tasks: Sequence[Task]) -> int:
    """The head's size for tasks already relabelled by :func:`apply_scenario`:

        n = 1 + max over tasks of max(labels ∪ units)

    with ``labels`` the values y takes (a task without ``labels`` takes its ``classes``) and
    ``units`` its active output units (none without). Not from ``classes`` once relabelled: in
    the domain scenario split MNIST's task 2/3 keeps ``classes`` (2, 3) but takes labels 0/1.
    For the class scenario that is 1 + the largest class, the rule of the code before the
    scenarios (the paper's 10); task: 10 for split MNIST, T·10 for T permuted tasks; domain: the
    largest task's number of classes."""
    if not tasks:
        raise ConfigError("scenario: no tasks given")
    return 1 + max(max(_outputs_used(t)) for t in tasks)


def head_size(task_classes: Sequence[Sequence[int]], scenario: Scenario | str) -> int:
    """:func:`n_outputs` of tasks with these classes in ``scenario``, found without their
    images (the head a run builds, for a time estimate before any data is loaded)."""
    none = (torch.zeros(0, 1), torch.zeros(0, dtype=torch.int64))
    tasks = [Task(str(i), tuple(c), None, none, none, none) for i, c in enumerate(task_classes)]
    return n_outputs(apply_scenario(tasks, scenario))


def _outputs_used(task: Task) -> tuple[int, ...]:
    """The output units ``task`` touches: its labels (its classes if not relabelled) and its
    active units."""
    labels = task.labels if task.labels is not None else task.classes
    return (*labels, *(task.units or ()))


def seen_units(tasks: Sequence[Task], phase: int) -> list[Task]:
    """The tasks as phase ``phase`` (0-based) of a class-incremental run with ``class_units``
    seen sees them: every task's ``units`` set to

        U_phase = ∪_{j ≤ phase} labels(task j)

    (labels as :func:`n_outputs` reads them), so training, the importance pass and every
    evaluation of that phase mask the units of classes not seen yet (van de Ven & Tolias's
    code: its ``active_classes`` in training, ``allowed_classes`` in the Fisher). After the
    last phase U is every label, so the final accuracies equal those with every unit active
    wherever the tasks use every unit of the head. For tasks already relabelled by
    :func:`apply_scenario` in the ``class`` or ``class-blocks`` scenario (no units of their
    own); a task with units of its own is a one-line ConfigError."""
    if not 0 <= phase < len(tasks):
        raise ConfigError(f"seen units: phase {phase} is not one of 0..{len(tasks) - 1}")
    if any(t.units is not None for t in tasks):
        raise ConfigError(
            "seen units: the tasks have units of their own (task-incremental); seen units "
            "are for the class-incremental scenarios"
        )
    seen: list[int] = []
    for task in tasks[: phase + 1]:
        labels = task.labels if task.labels is not None else task.classes
        seen += [int(v) for v in labels if int(v) not in seen]
    units = tuple(sorted(seen))
    return [dataclasses.replace(t, units=units) for t in tasks]


def head_bias(
    units: Sequence[int] | None, n: int, device: torch.device | str | None = None
) -> Tensor | None:
    """float32 [n]: 0 on the active ``units``, −inf elsewhere (None when every unit is
    active). Added to the logits it masks the other tasks' units: softmax gives them exactly
    0, the argmax never picks them. Units outside 0..n−1, or none, are a one-line ConfigError
    (an empty mask would make every logit −inf and the loss NaN)."""
    if units is None:
        return None
    active = [int(u) for u in units]
    if not active or min(active) < 0 or max(active) >= n:
        raise ConfigError(f"head_bias: units must be a non-empty subset of 0..{n - 1}: {active}")
    bias = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    bias[torch.as_tensor(active, dtype=torch.int64, device=device)] = 0.0
    return bias


__all__ = ["apply_scenario", "disjoint", "head_bias", "n_outputs", "seen_units"]
