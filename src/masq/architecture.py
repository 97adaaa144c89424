"""An MLP's architecture: its hidden layer sizes as written and read back, its widths and
parameter count, and the largest one a configuration may ask for."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

from masq.errors import ConfigError

_HIDDEN_RE = re.compile(r"[0-9]+(?:[-x][0-9]+)*", re.ASCII)
HIDDEN_HELP = "write one architecture as its layer sizes joined by dashes, e.g. 800-400-400"


def parse_hidden(value: Any, where: str = "hidden") -> tuple[int, ...]:
    """One architecture from (800, 400), [800, 400] or "800-400" (or "800x400"), else a
    one-line ConfigError.

    A string is strict: ASCII digits joined by single ``-`` (or ``x``), nothing else (no
    spaces, signs or commas), so a typo ("800-", "20-x", "-5", "800 800", "8_00") is an error,
    never a different network.
    """
    if isinstance(value, str):
        if not _HIDDEN_RE.fullmatch(value):
            raise ConfigError(f"{where}: bad architecture {value!r}; {HIDDEN_HELP}")
        sizes: tuple[Any, ...] = tuple(int(p) for p in value.replace("x", "-").split("-"))
    elif isinstance(value, list | tuple):
        sizes = tuple(value)
    else:
        raise ConfigError(
            f"{where}: bad architecture {value!r}; give a list of layer sizes, e.g. [800, 400], "
            'or a string like "800-400"'
        )
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ConfigError(
            f"{where}: bad architecture {value!r}; give at least one positive layer size"
        )
    return sizes


def hidden_text(hidden: Sequence[int]) -> str:
    """``(800, 400)`` -> ``"800-400"`` (the one spelling of an architecture in tables)."""
    return "-".join(str(int(h)) for h in hidden)


# The largest MLP a config may ask for: 2e9 parameters are 8 GB of float32 weights and about
# 32 GB with their gradients and Adam's two moments, beyond the machines masq runs on; refused
# before anything is allocated (a typo such as --hidden 99999999999999 must not reach torch).
MAX_PARAMS = 2_000_000_000


def check_model_size(hidden: Sequence[int], flag: str = "--hidden", in_features: int = 784) -> None:
    """A one-line ConfigError when the ``in_features``-``hidden``-10 MLP has more than
    :data:`MAX_PARAMS` parameters (:func:`n_params`), naming its size, the memory it needs and
    ``flag``."""
    n = n_params(hidden, in_features)
    if n > MAX_PARAMS:
        gb = 16 * n / 1e9  # float32 weights, gradients and Adam's two moments
        raise ConfigError(
            f"hidden: the MLP {hidden_text(mlp_widths(hidden, in_features))} has {n:.3g} "
            f"parameters (about {gb:.3g} GB to train), "
            f"above masq's limit of {MAX_PARAMS:.0e}; give smaller layer sizes with {flag}"
        )


def mlp_widths(
    hidden: Sequence[int] | str, in_features: int = 784, classes: int = 10
) -> tuple[int, ...]:
    """The layer widths of an MLP: (in_features, *hidden, classes)."""
    sizes = parse_hidden(hidden) if isinstance(hidden, str) else tuple(hidden)
    return (in_features, *sizes, classes)


def n_params(hidden: Sequence[int] | str, in_features: int = 784, classes: int = 10) -> int:
    """The number of weights and biases of the MLP: Σ_l (w_l w_{l+1} + w_{l+1})."""
    widths = mlp_widths(hidden, in_features, classes)
    return sum(a * b + b for a, b in itertools.pairwise(widths))


__all__ = [
    "HIDDEN_HELP",
    "MAX_PARAMS",
    "check_model_size",
    "hidden_text",
    "mlp_widths",
    "n_params",
    "parse_hidden",
]
