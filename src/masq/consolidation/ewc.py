"""The EWC penalty (the paper's EWC step), pure: state goes in, a scalar comes out.

Online EWC (Schwarz et al. 2018) keeps one running importance F <- γF + F_t and anchors
only the latest task's weights (:func:`online_importance`); with two tasks it is plain EWC.

An :class:`Anchor` holds the "lagged" parameters theta* (detached copies taken after
training on a task) and their importance F (FIM or MaSQ), keyed like
``model.named_parameters()``. The penalty of re-training is

    penalty(theta) = (lambda / 2) * sum_i sum_k F_ik * (theta_ik - theta*_ik)^2

over every weight matrix and bias vector i; a list of anchors (one per earlier task)
sums their terms. Its gradient is ``lambda * F * (theta - theta*)``. Nothing is stored
on the model; add the penalty visibly: ``loss = task_loss + penalty(model, anchors, lam)``.

Mismatched keys or shapes, an importance that is negative or not finite, and a λ that is
negative or not finite are errors (a one-line :class:`~masq.errors.ConfigError`), never a
silently zero (or NaN) penalty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from masq.config import RunConfig
from masq.consolidation.penalty import (
    check_lam,
    checked_anchors,
    penalty_for,
    quadratic_value,
)
from masq.consolidation.penalty import key_diff as _diff
from masq.consolidation.registry import Method, PhaseContext, PhasePlan, register_method
from masq.errors import ConfigError
from masq.importance import Importance, Measure, get_measure
from masq.slt import parse_spec


@dataclass(frozen=True, eq=False)
class Anchor:
    """theta* (``params``) and F (``importance``): detached tensors with the same keys."""

    params: Mapping[str, Tensor]
    importance: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        if set(self.params) != set(self.importance):
            raise ConfigError(
                "anchor: parameter and importance keys differ "
                f"({_diff(self.params, self.importance, 'params', 'importance')}); "
                "pass importance for every named parameter"
            )
        for name, p in self.params.items():
            if p.shape != self.importance[name].shape:
                raise ConfigError(
                    f"anchor: importance of {name!r} has shape {tuple(self.importance[name].shape)}"
                    f", the parameter {tuple(p.shape)}"
                )
        for name, f in self.importance.items():
            _check_importance(name, f)

    def to(self, device: torch.device | str) -> Anchor:
        """The same anchor with its tensors on ``device``."""
        return Anchor(
            MappingProxyType({k: v.to(device) for k, v in self.params.items()}),
            MappingProxyType({k: v.to(device) for k, v in self.importance.items()}),
        )


def _check_importance(name: str, f: Tensor) -> None:
    """A one-line ConfigError unless every entry of ``f`` is finite and >= 0 (one sync)."""
    bad = ~(torch.isfinite(f) & (f >= 0))
    if bool(bad.any()):
        n_nan = int((~torch.isfinite(f)).sum())
        n_neg = int((f < 0).sum())
        raise ConfigError(
            f"anchor: importance of {name!r} has {n_neg} negative and {n_nan} NaN/inf entries; "
            "an importance (FIM, MaSQ) is finite and >= 0: check how it was computed"
        )


def anchor(model: nn.Module, importance: Mapping[str, Tensor]) -> Anchor:
    """Anchor ``model``'s current parameters with ``importance`` (same keys, same shapes).

    Both are copied (detached, cloned), so later training of ``model`` leaves the anchor fixed.
    """
    named = dict(model.named_parameters())
    if set(named) != set(importance):
        raise ConfigError(
            f"anchor: importance keys do not match the model's parameters "
            f"({_diff(named, importance, 'model', 'importance')}); compute importance on this model"
        )
    params = {k: p.detach().clone() for k, p in named.items()}
    imp = {
        k: importance[k].detach().to(device=params[k].device, dtype=params[k].dtype).clone()
        for k in named
    }
    return Anchor(MappingProxyType(params), MappingProxyType(imp))


@dataclass(frozen=True, eq=False)
class FactorAnchor:
    """theta* (``params``, keyed like the model's parameters) and a structured importance
    (``importance``: the factors a penalty kind reads, e.g. K-FAC's {"0.A", "0.G", ...}),
    detached copies. Its penalty checks the factors against the layers."""

    params: Mapping[str, Tensor]
    importance: Mapping[str, Tensor]


def factor_anchor(model: nn.Module, factors: Mapping[str, Tensor]) -> FactorAnchor:
    """Anchor ``model``'s current parameters with the structured importance ``factors``
    (copied, detached); a one-line ConfigError when a factor is empty or not finite."""
    if not factors:
        raise ConfigError("anchor: the structured importance holds no factors; compute it again")
    for name, f in factors.items():
        if not bool(torch.isfinite(f).all()):
            raise ConfigError(
                f"anchor: importance factor {name!r} has NaN/inf entries; check how it was "
                "computed (a diverged network?)"
            )
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return FactorAnchor(
        MappingProxyType(params),
        MappingProxyType({k: f.detach().clone() for k, f in factors.items()}),
    )


def penalty(model: nn.Module, anchors: Anchor | Sequence[Anchor], lam: float) -> Tensor:
    """(lambda / 2) * sum over anchors a, tensors i, entries k of F^a_ik (theta_ik - theta*^a_ik)^2.

    A scalar tensor on the model's device, differentiable with respect to the parameters
    (:func:`masq.consolidation.penalty.quadratic_value`, the kernel's one definition).
    ``lam`` must be finite and >= 0; every anchor must hold the model's parameter names with
    the model's shapes (a net of the same depth but other widths is an error, naming the
    tensor).
    """
    lam_value = check_lam(lam)
    named = dict(model.named_parameters())
    anchor_list = checked_anchors(named, anchors)
    return quadratic_value(named, [(a.params, a.importance) for a in anchor_list], lam_value)


def online_importance(
    running: Mapping[str, Tensor] | None, new: Mapping[str, Tensor], gamma: float
) -> dict[str, Tensor]:
    """Online EWC's running importance (Schwarz et al. 2018): F <- γ F + F_t.

    ``running`` is None before the first consolidated task (then F = F_t). Keys must match.
    """
    if not 0 <= gamma <= 1:
        raise ConfigError(f"gamma: the online EWC decay must be in [0, 1], got {gamma}")
    if running is None:
        return {k: v.detach().clone() for k, v in new.items()}
    if set(running) != set(new):
        raise ConfigError(
            f"online EWC: importance keys changed ({_diff(running, new, 'running', 'new')})"
        )
    return {k: gamma * running[k] + new[k].detach() for k in new}


# ----------------------------------------------------------------------------- the methods


class EWC(Method):
    """EWC (Kirkpatrick et al. 2017): one anchor per earlier task, penalties summed,

        L_t(θ) = CE_t(θ) + Σ_{s<t} (λ/2) Σ_k F^s_k (θ_k − θ^s_k)²,

    θ^s the state at the end of phase s and F^s its importance (on task s's own training data,
    computed then). λ = 0 or a measure without importance is plain fine-tuning ("no EWC")."""

    name = "ewc"
    family = "EWC"
    fields: ClassVar[tuple[str, ...]] = ("lam",)
    stackable = True
    description = "one anchor per earlier task, penalties summed (Kirkpatrick et al. 2017)"
    prefix = "EWC"

    def label(self, values: Mapping[str, Any], measure: Measure, detailed: bool) -> str:
        if not measure.gives_importance or float(values.get("lam", 1.0)) == 0:
            return "no EWC"
        text = measure.text(values, detailed)
        if measure.standalone and measure.online:  # SI: its own method is online, γ = 1
            if self.prefix == "EWC":
                tasks = len(parse_spec(str(values.get("slt", "D5-5"))).task_classes)
                return text if tasks <= 2 else f"{text} (anchor per task)"
            gamma = float(values.get("gamma", 1.0))
            return text if gamma == 1 else f"{text} (γ={gamma:g})"
        if measure.standalone:
            return text if self.prefix == "EWC" else f"online {text}"
        return f"{self.prefix}+{text}"

    def canonical(self, config: RunConfig) -> dict[str, Any]:
        if config.lam == 0 or not get_measure(config.importance).gives_importance:
            return {"importance": "none", "lam": 0.0, "consolidation": "ewc"}
        if config.n_tasks == 2:  # one anchor: online EWC is EWC
            return {"consolidation": "ewc"}
        return {}

    def wants_importance(self, config: RunConfig, phase: int) -> bool:
        # task 1's pass always (a grid caches it; "none" gives {} at no cost), later ones
        # only where a penalty will use them
        if phase == 0:
            return True
        gives = get_measure(config.importance).gives_importance
        return gives and config.lam > 0 and phase < config.n_tasks - 1

    def init(self, config: RunConfig) -> list[Anchor | FactorAnchor]:
        return []

    def before_phase(
        self,
        config: RunConfig,
        state: Sequence[Anchor | FactorAnchor],
        model: nn.Module,
        phase: int,
        ctx: PhaseContext,
    ) -> PhasePlan:
        if not state or config.lam <= 0:
            return PhasePlan()
        kind = get_measure(config.importance).kind
        return PhasePlan(penalty=penalty_for(kind, model, state, config.lam))

    def after_phase(
        self,
        config: RunConfig,
        state: list[Anchor | FactorAnchor],
        model: nn.Module,
        importance: Importance | None,
        phase: int,
    ) -> list[Anchor | FactorAnchor]:
        if importance is None:  # no importance taken (no measure, or a diverged state)
            return state
        if get_measure(config.importance).kind != "diagonal":
            return [*state, factor_anchor(model, importance)]
        return [*state, anchor(model, importance)]  # an empty or partial one is an error


class OnlineEWC(EWC):
    """Online EWC (Schwarz et al. 2018): one running importance F̃ <- γ F̃ + F^t and the
    latest anchor, L_t(θ) = CE_t(θ) + (λ/2) Σ_k F̃_k (θ_k − θ^{t−1}_k)². With two tasks it is
    EWC (and canonicalised to it)."""

    name = "online-ewc"
    family = "online EWC"
    fields = ("lam", "gamma")
    description = "one running importance F <- γF + F_t, the latest anchor (Schwarz et al. 2018)"
    prefix = "online EWC"

    def check(self, config: RunConfig, measure: Measure) -> None:
        if measure.kind != "diagonal" and config.n_tasks > 2:
            raise ConfigError(
                f"consolidation online-ewc sums importances over tasks, which is defined for "
                f"diagonal ones; {measure.name!r} is structured ({measure.kind}): use "
                "--consolidation ewc (one anchor per task)"
            )

    def init(self, config: RunConfig) -> tuple[dict[str, Tensor] | None, list[Anchor]]:  # type: ignore[override]
        return None, []

    def before_phase(  # type: ignore[override]
        self,
        config: RunConfig,
        state: tuple[dict[str, Tensor] | None, list[Anchor]],
        model: nn.Module,
        phase: int,
        ctx: PhaseContext,
    ) -> PhasePlan:
        return super().before_phase(config, state[1], model, phase, ctx)

    def after_phase(  # type: ignore[override]
        self,
        config: RunConfig,
        state: tuple[dict[str, Tensor] | None, list[Anchor]],
        model: nn.Module,
        importance: Importance | None,
        phase: int,
    ) -> tuple[dict[str, Tensor] | None, list[Anchor]]:
        if importance is None:
            return state
        running = online_importance(state[0], importance, config.gamma)
        return running, [anchor(model, running)]


register_method(EWC())
register_method(OnlineEWC())
