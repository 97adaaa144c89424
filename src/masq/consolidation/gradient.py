"""The EWC penalty's gradient added straight to the parameters' gradients (no autograd graph).

For anchors a (θ^a, F^a) and weight λ the penalty (λ/2) Σ_a Σ_k F^a_k (θ_k − θ^a_k)² has the
gradient

    ∇_k = λ Σ_a F^a_k (θ_k − θ^a_k),

so after ``loss.backward()`` of the task loss alone, :class:`PenaltyGradient` adds it with
three fused multi-tensor operations per anchor and step (the difference θ − θ^a is formed
first, so nothing cancels in float32): the same update as
differentiating :func:`masq.consolidation.ewc.penalty` (equal up to float rounding; tested),
at a fraction of its cost. :func:`~masq.consolidation.ewc.penalty` stays the public pure
function for users' own loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from masq.consolidation.ewc import Anchor
from masq.errors import ConfigError


class PenaltyGradient:
    """Adds λ Σ_a F^a ⊙ (θ − θ^a) to the ``.grad`` of ``model``'s parameters when called.

    λF^a and θ^a are kept on the parameters' device and dtype; a scratch buffer holds
    θ − θ^a, so no tensor is allocated per step.
    """

    def __init__(self, model: nn.Module, anchors: Anchor | Sequence[Anchor], lam: float) -> None:
        if not lam >= 0 or lam == float("inf"):
            raise ConfigError(f"lam: the EWC weight must be a finite number >= 0, got {lam}")
        anchor_list = [anchors] if isinstance(anchors, Anchor) else list(anchors)
        if not anchor_list:
            raise ConfigError("penalty: no anchors given; pass at least one Anchor")
        named = dict(model.named_parameters())
        for a in anchor_list:
            if set(a.params) != set(named):
                raise ConfigError(
                    "penalty: anchor keys do not match the model's parameters; "
                    "anchor this model's parameters"
                )
            for k, p in named.items():
                if a.params[k].shape != p.shape:
                    raise ConfigError(
                        f"penalty: anchor tensor {k!r} has shape {tuple(a.params[k].shape)}, "
                        f"the model's {tuple(p.shape)}; anchor this model's parameters"
                    )
        self.names = list(named)
        with torch.no_grad():
            self.anchors = [[a.params[k].to(named[k]) for k in self.names] for a in anchor_list]
            self.lam_f = [
                [lam * a.importance[k].to(named[k]) for k in self.names] for a in anchor_list
            ]
        self.scratch = [torch.empty_like(named[k]) for k in self.names]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        """g_k += λ F^a_k (θ_k − θ^a_k) for every anchor a and parameter k of ``model`` (a
        zero gradient where none was set); three fused multi-tensor operations per anchor."""
        named = dict(model.named_parameters())
        params = [named[k] for k in self.names]
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for stars, lam_f in zip(self.anchors, self.lam_f, strict=True):
            torch._foreach_copy_(self.scratch, params)
            torch._foreach_sub_(self.scratch, stars)
            torch._foreach_addcmul_(grads, lam_f, self.scratch)
