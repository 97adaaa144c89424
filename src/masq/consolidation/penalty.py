"""The penalty kernel: the one definition of a quadratic consolidation penalty's value and
gradient, used by the single-run loop, the stacked loop (:mod:`masq.stacked.adam`) and the
public pure function :func:`masq.consolidation.ewc.penalty`.

For anchors a (θ^a, F^a) and weight λ the diagonal quadratic penalty and its gradient are

    P(θ)   = (λ/2) Σ_a Σ_k F^a_k (θ_k − θ^a_k)²
    ∇_k P  = λ Σ_a F^a_k (θ_k − θ^a_k).

EWC (F = the importance of a task), online EWC (F = the running importance), L2 (F = 1) and
IMM's L2-transfer (λ_T Σ (θ − θ_prev)², i.e. F = 1 at weight 2 λ_T) are all this penalty.

A penalty is an object with ``value(params)`` (differentiable: add it to the loss of your own
loop) and ``add_grad(params)`` (adds ∇P to the parameters' ``.grad`` without autograd, what
masq's loops do after ``loss.backward()`` of the task loss); calling it on a model does the
latter, so it plugs into :func:`masq.training.train_task`'s ``penalty_grad``. A structured
penalty (a Kronecker-factored F) implements the same two methods (:class:`Penalty`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from masq.errors import ConfigError
from masq.registry import Registry


class AnchorLike(Protocol):
    """What the kernel reads of an anchor (:class:`masq.consolidation.ewc.Anchor`): θ^a and
    F^a keyed like the model's parameters."""

    @property
    def params(self) -> Mapping[str, Tensor]: ...

    @property
    def importance(self) -> Mapping[str, Tensor]: ...


@runtime_checkable
class Penalty(Protocol):
    """A consolidation penalty: its value (differentiable in ``params``) and its gradient
    added to each parameter's ``.grad`` (module docstring)."""

    def value(self, params: Mapping[str, Tensor]) -> Tensor:
        """P(θ) at ``params``, differentiable."""
        ...

    def add_grad(self, params: Mapping[str, Tensor]) -> None:
        """``.grad`` += ∂P/∂θ for every parameter in ``params`` (a zero gradient where none)."""
        ...


def quadratic_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    anchors: Sequence[Tensor],
    lam_f: Sequence[Tensor],
    scratch: Sequence[Tensor],
) -> None:
    """g_k += λF_k ⊙ (θ_k − θ*_k) for lists of tensors, in place, with three fused
    multi-tensor operations: scratch = θ; scratch −= θ*; g += λF ⊙ scratch (the difference is
    formed first, so nothing cancels in float32). The one definition of the gradient."""
    torch._foreach_copy_(list(scratch), list(params))
    torch._foreach_sub_(list(scratch), list(anchors))
    torch._foreach_addcmul_(list(grads), list(lam_f), list(scratch))


def quadratic_value(
    params: Mapping[str, Tensor],
    anchors: Sequence[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]],
    lam: float,
) -> Tensor:
    """P(θ) = (λ/2) Σ_a Σ_k F^a_k (θ_k − θ^a_k)² for anchors given as (θ^a, F^a) pairs keyed
    like ``params``; a differentiable scalar. The one definition of the value."""
    terms: list[Tensor] = []
    for stars, importance in anchors:
        for name, theta in params.items():
            diff = theta - stars[name]
            terms.append((importance[name] * diff * diff).sum())
    return (0.5 * lam) * torch.stack(terms).sum()


def merged_anchor(
    anchors: Sequence[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One anchor (θ̄, F̄) whose diagonal penalty has the gradient of the sum over ``anchors``
    (pairs (θ^a, F^a) with the same keys): for every θ

        Σ_a F^a_k (θ_k − θ^a_k) = F̄_k (θ_k − θ̄_k),   F̄ = Σ_a F^a,   θ̄ = Σ_a F^a θ^a / F̄

    (θ̄ = θ^1 where F̄ = 0, where the term vanishes), formed in float64 and returned in the
    anchors' dtype. The value differs from the sum's by a constant in θ. One anchor comes back
    as it is (no rounding): what a stacked T-task run trains with (:mod:`masq.stacked`)."""
    if not anchors:
        raise ConfigError("merged_anchor: no anchors given; pass at least one (θ^a, F^a) pair")
    if len(anchors) == 1:
        stars, importance = anchors[0]
        return dict(stars), dict(importance)
    params: dict[str, Tensor] = {}
    total: dict[str, Tensor] = {}
    for key, first in anchors[0][0].items():
        f_sum = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        weighted = torch.zeros_like(f_sum)
        for stars, importance in anchors:
            f = importance[key].to(torch.float64)
            f_sum += f
            weighted += f * stars[key].to(torch.float64)
        mean = torch.where(
            f_sum > 0,
            weighted / f_sum.clamp_min(torch.finfo(f_sum.dtype).tiny),
            first.to(torch.float64),
        )
        params[key] = mean.to(first.dtype)
        total[key] = f_sum.to(anchors[0][1][key].dtype)
    return params, total


def check_lam(lam: object, what: str = "lam") -> float:
    """λ as a float, else a one-line ConfigError: it must be a finite number >= 0."""
    try:
        value = float(lam)  # type: ignore[arg-type]  # anything float() takes
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{what}: the penalty weight must be a number, got {lam!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise ConfigError(f"{what}: the penalty weight must be a finite number >= 0, got {lam}")
    return value


def key_diff(a: Mapping[str, object], b: Mapping[str, object], name_a: str, name_b: str) -> str:
    """ "only in A: [...], only in B: [...]" of two mappings' keys (for error messages)."""
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    return f"only in {name_a}: {only_a}, only in {name_b}: {only_b}"


def check_anchor_type(anchor: object, which: str = "") -> None:
    """A one-line ConfigError unless ``anchor`` has ``params`` and ``importance`` (an Anchor);
    ``which`` ("2 ") says which one of a list."""
    if isinstance(anchor, Mapping) or not (
        hasattr(anchor, "params") and hasattr(anchor, "importance")
    ):
        kind = "a dict" if isinstance(anchor, Mapping) else f"a {type(anchor).__name__}"
        raise ConfigError(
            f"penalty: anchor {which}is {kind}; give masq.consolidation.ewc.anchor(model, "
            f"importance){', not a dict' if isinstance(anchor, Mapping) else ''}"
        )


def checked_anchors(
    named: Mapping[str, Tensor], anchors: AnchorLike | Sequence[AnchorLike]
) -> list[AnchorLike]:
    """``anchors`` as a list, after checking that there is one at least and that each holds
    the parameter names of ``named`` with their shapes (a net of the same depth but other
    widths is an error naming the tensor); else a one-line ConfigError."""
    several = isinstance(anchors, Sequence)
    anchor_list: list[AnchorLike] = list(anchors) if isinstance(anchors, Sequence) else [anchors]
    if not anchor_list:
        raise ConfigError("penalty: no anchors given; pass at least one Anchor")
    for index, a in enumerate(anchor_list):
        check_anchor_type(a, f"{index} " if several else "")
        if set(named) != set(a.params):
            raise ConfigError(
                "penalty: anchor keys do not match the model's parameters "
                f"({key_diff(named, a.params, 'model', 'anchor')}); anchor this model's "
                "parameters"
            )
        for name, theta in named.items():
            if theta.shape != a.params[name].shape:
                raise ConfigError(
                    f"penalty: anchor tensor {name!r} has shape {tuple(a.params[name].shape)}, "
                    f"the model's {tuple(theta.shape)}; anchor a model of this architecture"
                )
    return anchor_list


class QuadraticPenalty:
    """The diagonal quadratic penalty of ``anchors`` (objects with ``params`` θ^a and
    ``importance`` F^a, e.g. :class:`masq.consolidation.ewc.Anchor`) at weight ``lam``, for
    the parameters of ``model`` (module docstring).

    λF^a and θ^a are kept on the parameters' device and dtype; a scratch buffer holds
    θ − θ^a, so :meth:`add_grad` allocates nothing per step.
    """

    def __init__(
        self, model: nn.Module, anchors: AnchorLike | Sequence[AnchorLike], lam: float
    ) -> None:
        lam = check_lam(lam)
        named = dict(model.named_parameters())
        anchor_list = checked_anchors(named, anchors)
        self.names = list(named)
        self.lam = lam
        with torch.no_grad():
            self.anchors = [[a.params[k].to(named[k]) for k in self.names] for a in anchor_list]
            self.importances = [
                [a.importance[k].to(named[k]) for k in self.names] for a in anchor_list
            ]
            self.lam_f = [[lam * f for f in imps] for imps in self.importances]
        self.scratch = [torch.empty_like(named[k]) for k in self.names]

    def value(self, params: Mapping[str, Tensor]) -> Tensor:
        """P(θ) at ``params`` (differentiable; :func:`quadratic_value`)."""
        pairs = [
            (dict(zip(self.names, stars, strict=True)), dict(zip(self.names, imps, strict=True)))
            for stars, imps in zip(self.anchors, self.importances, strict=True)
        ]
        return quadratic_value({k: params[k] for k in self.names}, pairs, self.lam)

    @torch.no_grad()
    def add_grad(self, params: Mapping[str, Tensor]) -> None:
        """g_k += λ F^a_k (θ_k − θ^a_k) for every anchor a and parameter k (a zero gradient
        where none was set): :func:`quadratic_grad_` once per anchor."""
        tensors = [params[k] for k in self.names]
        grads = []
        for p in tensors:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for stars, lam_f in zip(self.anchors, self.lam_f, strict=True):
            quadratic_grad_(grads, tensors, stars, lam_f, self.scratch)

    def __call__(self, model: nn.Module) -> None:
        """:meth:`add_grad` for ``model``'s parameters (``train_task(penalty_grad=...)``)."""
        self.add_grad(dict(model.named_parameters()))

    def merged(self) -> tuple[float, dict[str, Tensor], dict[str, Tensor]]:
        """(λ, θ̄, F̄): this penalty as one anchor with the same gradient
        (:func:`merged_anchor`), keyed like the model's parameters."""
        pairs = [
            (dict(zip(self.names, stars, strict=True)), dict(zip(self.names, imps, strict=True)))
            for stars, imps in zip(self.anchors, self.importances, strict=True)
        ]
        params, importance = merged_anchor(pairs)
        return self.lam, params, importance


PenaltyFactory = Callable[[nn.Module, Sequence[AnchorLike], float], Penalty]
"""``factory(model, anchors, lam) -> Penalty``: the penalty of a kind of importance."""

PENALTY_KINDS: Registry[PenaltyFactory] = Registry(
    "kind", "penalty kind", "masq.consolidation.penalty.register_penalty_kind"
)
"""{measure kind: penalty factory}: "diagonal" is :class:`QuadraticPenalty`; structured
measures (:attr:`masq.importance.Measure.kind`) register theirs (K-FAC: "kfac")."""


def register_penalty_kind(kind: str, factory: PenaltyFactory, *, replace: bool = False) -> None:
    """Register the penalty ``factory(model, anchors, lam)`` of importances of ``kind``."""
    PENALTY_KINDS.register(kind, factory, replace=replace)


def penalty_for(kind: str, model: nn.Module, anchors: Sequence[AnchorLike], lam: float) -> Penalty:
    """The penalty of importances of ``kind`` for ``model``'s parameters: its registered
    factory called with ``anchors`` and ``lam``; an unknown kind is a one-line ConfigError."""
    return PENALTY_KINDS.lookup(kind)(model, anchors, lam)


register_penalty_kind("diagonal", QuadraticPenalty)


__all__ = [
    "PENALTY_KINDS",
    "AnchorLike",
    "Penalty",
    "PenaltyFactory",
    "QuadraticPenalty",
    "check_anchor_type",
    "check_lam",
    "checked_anchors",
    "key_diff",
    "merged_anchor",
    "penalty_for",
    "quadratic_grad_",
    "quadratic_value",
    "register_penalty_kind",
]
