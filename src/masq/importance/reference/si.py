"""The naive twin of SI (:mod:`masq.importance.si`): the path integral and Ω from an explicit
trajectory, in float64, with plain loops over the steps and the parameters.

``trajectory`` is the list of parameter dicts θ(0), ..., θ(S) (θ(0) at the start of the
phase, θ(s+1) after step s) and ``grads`` the task loss's gradients g(0), ..., g(S−1), g(s)
at θ(s) on step s's mini-batch (the gradient WITHOUT the penalty's part):

    ω_k = Σ_{s<S} −g_k(s) (θ_k(s+1) − θ_k(s)),    Ω_k = max(ω_k, 0) / ((θ_k(S) − θ_k(0))² + ξ).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from masq.errors import ConfigError

Params = Mapping[str, Tensor]


def _check(trajectory: Sequence[Params], grads: Sequence[Params]) -> None:
    """A one-line ConfigError unless there is one more point than gradients, all keyed alike."""
    if len(trajectory) != len(grads) + 1 or not grads:
        raise ConfigError(
            f"si reference: need S + 1 points and S >= 1 gradients, got {len(trajectory)} "
            f"and {len(grads)}"
        )
    keys = set(trajectory[0])
    if any(set(t) != keys for t in trajectory) or any(set(g) != keys for g in grads):
        raise ConfigError("si reference: every point and gradient must hold the same names")


def path_integral(trajectory: Sequence[Params], grads: Sequence[Params]) -> dict[str, Tensor]:
    """ω_k = Σ_s −g_k(s) (θ_k(s+1) − θ_k(s)) in float64, step by step."""
    _check(trajectory, grads)
    omega = {n: torch.zeros_like(v, dtype=torch.float64) for n, v in trajectory[0].items()}
    for s, g in enumerate(grads):
        for name in omega:
            before = trajectory[s][name].double()
            after = trajectory[s + 1][name].double()
            omega[name] = omega[name] - g[name].double() * (after - before)
    return omega


def si_importance(
    trajectory: Sequence[Params], grads: Sequence[Params], damping: float
) -> dict[str, Tensor]:
    """Ω_k = max(ω_k, 0) / ((θ_k(S) − θ_k(0))² + ξ) in float64 (module docstring)."""
    omega = path_integral(trajectory, grads)
    out = {}
    for name, w in omega.items():
        delta = trajectory[-1][name].double() - trajectory[0][name].double()
        out[name] = torch.where(w > 0, w, torch.zeros_like(w)) / (delta * delta + damping)
    return out


def sgd_path(
    grad: Callable[[Tensor], Tensor], theta0: Tensor, lr: float, steps: int
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """(trajectory, grads) of plain gradient descent θ(s+1) = θ(s) − η ∇L(θ(s)) on one
    float64 vector named "theta", for :func:`path_integral`."""
    theta = theta0.double().clone()
    trajectory, grads = [{"theta": theta.clone()}], []
    for _ in range(steps):
        g = grad(theta).double()
        grads.append({"theta": g.clone()})
        theta = theta - lr * g
        trajectory.append({"theta": theta.clone()})
    return trajectory, grads


__all__ = ["path_integral", "sgd_path", "si_importance"]
