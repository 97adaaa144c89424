"""Curves and the points read off them (the paper's protocol), torch-free.

A curve is ``{"iteration": [...], "<set name>": [accuracy, ...], ...}``, recorded during one
phase of a run. Set names: "D1", "D2", ... (test sets), unions such as "D1∪D2" computed
from the members' counts, and with validation "val:D1", "val:D1∪D2", ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Curve = dict[str, list[float]]
VAL = "val:"


def task_name(index: int) -> str:
    """The set name of task ``index`` (0-based): "D1", "D2", ..."""
    return f"D{index + 1}"


def union_name(n_tasks: int) -> str:
    """The name of the union of the first ``n_tasks`` tasks: "D1∪D2", "D1∪D2∪D3", ..."""
    return "∪".join(task_name(i) for i in range(n_tasks))


def best_and_last_indices(curve: Mapping[str, Sequence[float]], key: str) -> tuple[int, int]:
    """(index of "best", index of "last") of ``curve`` by ``curve[key]``.

    best = argmax of ``key`` over the evaluations after at least one training step of the
    phase (iteration > 0; all of them if there are none), NaNs ignored, the earliest on ties;
    last = the final evaluation.
    """
    its, values = curve["iteration"], curve[key]
    candidates = [i for i, it in enumerate(its) if it > 0] or list(range(len(its)))
    finite = [i for i in candidates if not math.isnan(values[i])] or candidates
    best = max(finite, key=lambda i: (values[i], -i))
    return best, len(its) - 1


def point(curve: Mapping[str, Sequence[float]], index: int) -> dict[str, float]:
    """Every series of ``curve`` at position ``index`` ({set name: value, "iteration": it})."""
    return {name: values[index] for name, values in curve.items() if len(values) > index}
