"""What the ``masq analyze`` commands share: the λ-sweep flags, SLT and architecture parsing,
the command line of a manifest and the list of files written."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from masq.cli.options import hidden_from_tokens
from masq.config import FIELD
from masq.slt import parse_spec

# Flags of `masq analyze lambda` that set one value of a grid axis for every run.
SWEEP_FIELDS: tuple[str, ...] = (
    "iters1", "iters2", "eval_every", "eval_schedule", "precision", "init", "lr1", "batch_size",
    "masq_batch", "device",
)  # fmt: skip
# Flags of `masq analyze lambda` for the measures' settings and the scenario.
MEASURE_FIELDS: tuple[str, ...] = ("fisher_labels", "fisher_samples", "si_damping", "scenario")
# Of those, the ones whose values are names (checked by the grid, like its own flags).
SWEEP_NAMES: tuple[str, ...] = ("eval_schedule", "precision", "init", "fisher_labels",
                                "scenario")  # fmt: skip


def command_text(words: Sequence[Any]) -> str:
    """A shell command line from its words (each quoted where needed)."""
    return " ".join(shlex.quote(str(w)) for w in words)


def hidden_of(tokens: Sequence[str] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """The architecture of ``--hidden`` tokens, or ``default`` where none were given."""
    return default if tokens is None else hidden_from_tokens(tokens)


def slt_text(slt: str) -> str:
    """The canonical spelling of an SLT (a one-line ConfigError for a bad one)."""
    return parse_spec(slt).text


def print_written(paths: Sequence[Path]) -> None:
    """Print the files an analysis wrote, on one line."""
    print(f"written: {', '.join(str(p) for p in paths)}")


def add_lam_flags(add: Callable[..., Any], fields: Sequence[str], per_decade: int) -> None:
    """One flag per configuration field of ``fields`` (one value for every run; the names of
    :data:`SWEEP_NAMES` as text, checked by the grid), then the λ grid's --lam-min, --lam-max
    and --per-decade (default ``per_decade``): the flags `analyze lambda` and `analyze kfac`
    share. ``add`` is a parser's ``add_argument``."""
    for name in fields:
        spec = FIELD[name]
        kind = str if name in SWEEP_NAMES else spec.kind
        add(spec.flag, type=kind, default=None, metavar="V", help=f"({spec.default})")
    add("--lam-min", type=float, default=1.0, help="smallest λ > 0 (default: 1)")
    add("--lam-max", type=float, default=1e12, help="largest λ (default: 1e12)")
    add("--per-decade", type=int, default=per_decade,
        help=f"λ values per decade (default: {per_decade})")  # fmt: skip
