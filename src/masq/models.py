"""Fully-connected ReLU networks with one shared output layer (the paper's setting).

``mlp((800, 800))`` is ``784 -> 800 -> ReLU -> 800 -> ReLU -> 10``; parameter names are
those of ``nn.Sequential`` ("0.weight", "0.bias", "2.weight", ...). Initialization is
seeded by an explicit ``torch.Generator``; the global RNG is never touched.

- ``init="torch"``: PyTorch's default ``nn.Linear`` init, W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (``kaiming_uniform_(a=sqrt(5))`` for W), drawn in layer order, W before b.
- ``init="tf"``: the authors' group's TensorFlow-tutorial init, W ~ N(0, 0.1^2) truncated
  at +-2 sigma = +-0.2, b = 0.1.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from masq.config import Init, choice, parse_hidden
from masq.errors import ConfigError

TF_STD = 0.1
TF_BIAS = 0.1


def check_hidden(hidden: Sequence[int] | str) -> tuple[int, ...]:
    """``hidden`` as a tuple of positive ints, else a one-line ConfigError.

    A sequence of sizes, or one architecture written with dashes ("800-400",
    :func:`masq.config.parse_hidden`); a bare number is refused (``hidden=(800,)`` is one layer).
    """
    if isinstance(hidden, str):
        return parse_hidden(hidden, "hidden")
    if not isinstance(hidden, Sequence) or isinstance(hidden, bytes):
        raise ConfigError(
            f"hidden: give a sequence of layer sizes, e.g. hidden=(800,) for one layer or "
            f"(800, 800) for two, got {hidden!r}"
        )
    sizes = tuple(hidden)
    if len(sizes) == 0:
        raise ConfigError("hidden: give at least one hidden layer size, e.g. hidden=(800, 800)")
    if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ConfigError(f"hidden: layer sizes must be positive integers, got {list(sizes)}")
    return cast(tuple[int, ...], sizes)  # ints: checked just above


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (Python or NumPy, not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def mlp(
    hidden: Sequence[int] | str = (800, 800),
    *,
    in_features: int = 784,
    classes: int = 10,
    init: Init | str = Init.TORCH,
    seed: int = 0,
) -> nn.Sequential:
    """``in_features -> hidden[0] -> ReLU -> ... -> hidden[-1] -> ReLU -> classes`` (logits)."""
    sizes = check_hidden(hidden)
    for name, value in (("in_features", in_features), ("classes", classes)):
        if _integer(value) is None or value <= 0:
            raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    if _integer(seed) is None:
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    choice(Init, init, "init")
    widths = (in_features, *sizes, classes)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        # skip_init allocates without running reset_parameters (which would use the global RNG)
        layers.append(nn.utils.skip_init(nn.Linear, fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    initialize(model, init=init, seed=seed)
    return model


@torch.no_grad()
def initialize(model: nn.Module, *, init: Init | str = Init.TORCH, seed: int = 0) -> nn.Module:
    """Re-initialize every ``nn.Linear`` of ``model`` in place from ``Generator(seed)``."""
    init = choice(Init, init, "init")
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if init == Init.TORCH:
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound, generator=generator)
        else:
            nn.init.trunc_normal_(
                layer.weight, std=TF_STD, a=-2 * TF_STD, b=2 * TF_STD, generator=generator
            )
            if layer.bias is not None:
                layer.bias.fill_(TF_BIAS)
    return model
