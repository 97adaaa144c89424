"""Naive reference implementations: one backward pass per sample, in float64, no tricks.

Each function computes the same quantity as its fast twin in :mod:`masq.importance`, by the
shortest route: the gradient of every sample's own loss from its own backward pass. They are slow
(N backward passes, C N for ``labels="exact"``) and meant for tiny models: to test the fast code,
and to check a layer of your own against it::

    from masq import importance
    from masq.importance import reference

    fast = importance.fisher(model, importance.batches(x, y, 50))
    slow = reference.fisher(model, importance.batches(x, y, 50))
    for name in fast:
        torch.testing.assert_close(fast[name].double(), slow[name], rtol=1e-4, atol=1e-6)

Every function works on a float64 copy of the model (``copy.deepcopy(model).double()``) in eval
mode, with floating inputs cast to float64, so the caller's model is never touched and the result
is the float64 value of the model's own (rounded) parameters, whatever their dtype. Results are
float64 tensors (or a :class:`~masq.importance.BlockStats`) on the model's device.
"""

from masq.importance.reference.core import (
    fisher,
    fisher_block,
    fisher_block_stats,
    mas,
    masq,
    per_sample_gradients,
    sample_gradient,
)
from masq.importance.reference.kfac import (
    kfac_factors,
    kfac_penalty,
    layer_block_penalty,
    layer_fisher_block,
)
from masq.importance.reference.si import path_integral, sgd_path, si_importance

__all__ = [
    "fisher",
    "fisher_block",
    "fisher_block_stats",
    "kfac_factors",
    "kfac_penalty",
    "layer_block_penalty",
    "layer_fisher_block",
    "mas",
    "masq",
    "path_integral",
    "per_sample_gradients",
    "sample_gradient",
    "sgd_path",
    "si_importance",
]
