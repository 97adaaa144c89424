"""Parameter importance: the diagonal empirical Fisher, MaSQ, and full Fisher-block statistics.

Notation (the paper's): a pass over N samples x_n with labels y_n, split into K
batches b; the per-sample loss is l_n = loss(model(x_n), y_n) and the per-sample gradient
is g_n = d l_n / d theta.

- :func:`fisher` (per-sample squares, then the mean): F_k = (1/N) sum_n g_nk^2
- :func:`masq` (batch means, then squares): F_k = (1/K) sum_b ((1/|b|) sum_{n in b} g_nk)^2,
  or (1/K) sum_b |b| ((1/|b|) sum_{n in b} g_nk)^2 with ``scale="sum"``
- :func:`fisher_block_stats`: statistics of the full block F_ij = (1/N) sum_n g_ni g_nj of one
  parameter tensor (:class:`BlockStats`).

Quickstart, from any training loop::

    from masq import importance

    data = importance.batches(x_train, y_train, batch_size=1000)
    imp = importance.fisher(model, data)            # or importance.masq(model, data)
    imp["0.weight"]                                 # shaped like model[0].weight
    importance.summary(imp)["0.weight"]["max"]

    # the same, by one backward pass per sample (slow; to check a layer of your own)
        slow = importance.reference.fisher(model, importance.batches(x_small, y_small, 10))

The choices are :class:`~masq.config.FisherLabels` (``labels=`` of :func:`fisher`: "true",
"sampled", "exact") and :class:`~masq.config.Scale` (``scale=`` of :func:`masq`: "mean", "sum");
each accepts the Enum member or its value.

Contract shared by every function here:

- ``batches`` is any iterable of ``(x, y)`` pairs; it is iterated exactly once.
- ``loss(logits, y)`` returns one loss per sample (shape ``[B]``, i.e. ``reduction="none"``);
  the default is :func:`cross_entropy` on logits. Losses are combined here: summed for
  per-sample gradients (so no 1/B factor enters them), averaged for MaSQ's batch gradients.
- The importance is computed with the model in eval mode (dropout off, batch norm on its running
  statistics) so that samples are independent; the model is handed back exactly as it was found:
  weights, ``.grad`` (None or not), train/eval flags and ``requires_grad`` flags are untouched.
- ``device=None`` computes on the model's device. Another device computes on a copy of the model
  moved there; the results always come back on the device and in the dtype of each parameter.
- The result maps the name of every trainable parameter (``requires_grad``) to a tensor of its
  shape. Sums are accumulated in float64.

Modules: :mod:`~masq.importance.registry` (the registry of measures: what
``RunConfig.importance`` names, :class:`Measure`, :func:`register_measure`),
:mod:`~masq.importance.measures` (the paper's: ``fisher``, ``masq``, ``none``),
:mod:`~masq.importance.mas` (MAS, Aljundi et al. 2018), :mod:`~masq.importance.l2` (uniform),
:mod:`~masq.importance.gradients` (per-sample gradients: the closed form for ``nn.Linear``,
torch.func otherwise), :mod:`~masq.importance.persample` (model handling and input checks
shared by the measures), :mod:`~masq.importance.diagonal` (:func:`fisher`, :func:`masq`),
:mod:`~masq.importance.blocks` (:func:`fisher_block_stats`), :mod:`~masq.importance.reference`
(the naive twins).
"""

from __future__ import annotations

from masq.config import FisherLabels, Scale

# The measures register themselves when their module loads: measures (fisher, masq, none),
# l2 and mas; a new one is one module plus its line here.
from masq.importance import (
    kfac,
    l2,
    measures,
    reference,
    si,
)
from masq.importance.blocks import BlockStats, fisher_block_stats
from masq.importance.diagonal import batches, cross_entropy, fisher, masq, summary
from masq.importance.mas import mas
from masq.importance.persample import Importance, LossFn
from masq.importance.registry import (
    MEASURES,
    Measure,
    MeasureContext,
    StepTracker,
    get_measure,
    measure_names,
    register_measure,
)

__all__ = [
    "MEASURES",
    "BlockStats",
    "FisherLabels",
    "Importance",
    "LossFn",
    "Measure",
    "MeasureContext",
    "Scale",
    "StepTracker",
    "batches",
    "cross_entropy",
    "fisher",
    "fisher_block_stats",
    "get_measure",
    "kfac",
    "l2",
    "mas",
    "masq",
    "measure_names",
    "measures",
    "reference",
    "register_measure",
    "si",
    "summary",
]
