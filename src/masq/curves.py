"""The "best" and "last" points of a re-training curve (PAPER.md section 3), torch-free.

Shared by :mod:`masq.experiment` (building a Result) and :mod:`masq.results` (selection on
validation curves when loading a store), so both apply one rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def best_and_last_indices(curve: Mapping[str, Sequence[float]], key: str) -> tuple[int, int]:
    """(index of "best", index of "last") of ``curve`` by ``curve[key]``.

    best = argmax of ``key`` over the evaluations after at least one re-training step
    (iteration > 0; all of them if there are none), NaNs ignored, the earliest on ties;
    last = the final evaluation.
    """
    its, values = curve["iteration"], curve[key]
    candidates = [i for i, it in enumerate(its) if it > 0] or list(range(len(its)))
    finite = [i for i in candidates if not math.isnan(values[i])] or candidates
    best = max(finite, key=lambda i: (values[i], -i))
    return best, len(its) - 1
