"""SLT specs (torch-free): ``"D5-5"`` -> the classes of each task.

Spec grammar (the paper's D5-5, D9-1, DP10-10 and their generalisations)::

    D<a>-<b>[-<c>...]            class splits: consecutive blocks of a, b, c... classes
                                 in the order 0, 1, ..., summing to the number of classes
    D<a>-<b>[...]:<c0>,<c1>,...  the same blocks taken over an explicit class order
    DP<n>-<n>[-<n>...]           permuted tasks over all n classes: task 1 unpermuted,
                                 every later task its own seeded pixel permutation

The paper's SLTs are ``D5-5``, ``D9-1`` and ``DP10-10``; :mod:`masq.tasks` builds them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from masq.errors import ConfigError

SPEC_HELP = (
    "accepted forms: D<a>-<b>[-<c>...] (class blocks summing to the number of classes, "
    "e.g. D5-5, D9-1, D2-2-2-2-2), D<a>-<b>:<class order> (e.g. D5-5:3,7,0,1,2,4,5,6,8,9), "
    "DP<n>-<n>[-<n>...] (permuted tasks, e.g. DP10-10)"
)

_SPLIT_RE = re.compile(r"^D(\d+(?:-\d+)+)(?::([\d,\s]+))?$")
_PERM_RE = re.compile(r"^DP(\d+(?:-\d+)+)$")


@dataclass(frozen=True)
class SltSpec:
    """A parsed SLT spec: per task, its classes and whether it is permuted."""

    text: str
    task_classes: tuple[tuple[int, ...], ...]
    permuted: bool


def parse_spec(spec: str, num_classes: int = 10) -> SltSpec:
    """Parse an SLT spec into the classes of each task; a malformed one is a ConfigError."""
    text = spec.strip().upper().replace(" ", "")
    perm_match = _PERM_RE.match(text)
    if perm_match:
        sizes = [int(s) for s in perm_match.group(1).split("-")]
        if any(s != num_classes for s in sizes):
            raise ConfigError(
                f"SLT spec {spec!r}: permuted tasks use all {num_classes} classes each "
                f"(e.g. DP{num_classes}-{num_classes}); {SPEC_HELP}"
            )
        all_classes = tuple(range(num_classes))
        return SltSpec(text, tuple(all_classes for _ in sizes), permuted=True)
    split_match = _SPLIT_RE.match(text)
    if not split_match:
        raise ConfigError(f"unknown SLT spec {spec!r}; {SPEC_HELP}")
    sizes = [int(s) for s in split_match.group(1).split("-")]
    order = _parse_order(spec, split_match.group(2), num_classes)
    if any(s == 0 for s in sizes) or sum(sizes) != num_classes:
        raise ConfigError(
            f"SLT spec {spec!r}: block sizes {sizes} must be positive and sum to "
            f"{num_classes}; {SPEC_HELP}"
        )
    bounds = list(itertools.accumulate(sizes, initial=0))
    blocks = tuple(tuple(order[a:b]) for a, b in itertools.pairwise(bounds))
    return SltSpec(text, blocks, permuted=False)


def _parse_order(spec: str, order_text: str | None, num_classes: int) -> list[int]:
    if order_text is None:
        return list(range(num_classes))
    try:
        order = [int(c) for c in order_text.split(",") if c != ""]
    except ValueError:  # pragma: no cover - the regex admits digits and commas only
        raise ConfigError(f"SLT spec {spec!r}: bad class order; {SPEC_HELP}") from None
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(
            f"SLT spec {spec!r}: the class order must list each of 0..{num_classes - 1} "
            f"exactly once; {SPEC_HELP}"
        )
    return order
