"""L2: uniform importance, F_k = 1 for every parameter (``--importance l2``).

With it the consolidation penalty is plain L2 regularisation towards the previous solution,

    (λ/2) Σ_k (θ_k − θ*_k)²,

the baseline every continual-learning comparison reports beside EWC (e.g. Kirkpatrick et al.
2017, fig. 2A; van de Ven & Tolias 2019). No data is read; the importance is a tensor of ones
shaped, placed and typed like each trainable parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from masq.importance.persample import trainable_params
from masq.importance.registry import Importance, Measure, MeasureContext, register_measure
from masq.tasks import XY


def uniform(model: nn.Module) -> Importance:
    """{name: ones_like(θ)} for every trainable parameter θ of ``model`` (F_k = 1)."""
    params = trainable_params(model)  # a ConfigError when there are none
    return {n: torch.ones_like(p, memory_format=torch.contiguous_format) for n, p in params.items()}


def l2_measure(model: nn.Module, data: XY, ctx: MeasureContext) -> Importance:
    """The registry's ``l2`` measure: :func:`uniform` (``data`` is not read)."""
    return uniform(model)


L2 = register_measure(
    Measure(
        "l2",
        label="L2",
        compute=l2_measure,
        standalone=True,
        reads_data=False,
        description="uniform importance: L2 regularisation towards the previous solution",
    )
)

__all__ = ["L2", "l2_measure", "uniform"]
