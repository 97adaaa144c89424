"""Incremental Moment Matching (Lee et al. 2017, NeurIPS): merging and its transfer terms.

Pure functions over parameter dicts keyed like ``model.state_dict()`` (the MLPs of masq have
only weights and biases). With θ_k the solution of task k, F_k its importance (FIM or MaSQ,
on task k's training data at θ_k) and weights α_k >= 0 with Σ_k α_k = 1:

    mean-IMM:  θ = Σ_k α_k θ_k                                        (Lee et al., eq. 4)
    mode-IMM:  θ = (Σ_k α_k F̃_k ⊙ θ_k) / (Σ_k α_k F̃_k),  elementwise  (Lee et al., eq. 7)

with F̃_k = F_k + ε F̄, F̄ the mean of every entry of every F_k (one number for the whole
merge; 1 if that is 0). The guard is relative, so mode-IMM stays exactly what it is,
invariant to a common scale c of all F_k: (Σ α c F θ)/(Σ α c F) = (Σ α F θ)/(Σ α F), and
the scale conventions of MaSQ ("mean" is ~1000x smaller than the FIM) cannot change it. An
entry where every F_k is 0 gets the α-weighted mean of the θ_k (mean-IMM).

Transfer terms used while training task k from θ_{k−1} (Lee et al., section 3.2):

    L2-transfer:   λ Σ_i (θ_i − θ_{k−1,i})²                           (eq. 10; no 1/2)
    drop-transfer: θ_eff = θ_{k−1} + m ⊙ (θ − θ_{k−1}) / (1 − p),  m_i ~ Bernoulli(1 − p)

drop-transfer is dropout of the difference to the previous weights (eq. 11 drops it per
unit; here per parameter entry), with E[θ_eff] = θ: training sees θ_eff, evaluation θ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from masq.errors import ConfigError

Params = Mapping[str, Tensor]
DEFAULT_EPS = 1e-8  # relative to the mean importance (module docstring)


def check_alphas(alphas: Sequence[float], n: int) -> list[float]:
    """``alphas`` as floats, after checking there are ``n`` of them, all >= 0, summing to 1
    (within 1e-6); a one-line ConfigError otherwise."""
    values = [float(a) for a in alphas]
    if len(values) != n:
        raise ConfigError(f"imm: {len(values)} weights α for {n} models; give one per model")
    if any(not math.isfinite(a) or a < 0 for a in values):
        raise ConfigError(f"imm: weights α must be finite and >= 0, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"imm: weights α must sum to 1, got {values} (sum {sum(values)})")
    return values


def _check_keys(dicts: Sequence[Params], what: str, keys: Sequence[str]) -> None:
    for k, d in enumerate(dicts):
        if set(d) != set(keys):
            missing = sorted(set(keys) - set(d))
            extra = sorted(set(d) - set(keys))
            raise ConfigError(
                f"imm: {what} {k + 1} has other tensors than model 1 "
                f"(missing {missing}, extra {extra}); merge models of one architecture"
            )


def _single(alphas: Sequence[float]) -> int | None:
    nonzero = [k for k, a in enumerate(alphas) if a != 0]
    return nonzero[0] if len(nonzero) == 1 else None


def mean_imm(params_list: Sequence[Params], alphas: Sequence[float]) -> dict[str, Tensor]:
    """Mean-IMM: θ = Σ_k α_k θ_k for every tensor (module docstring). A merge with a single
    nonzero α_k is exactly θ_k (a copy)."""
    if not params_list:
        raise ConfigError("imm: no models to merge")
    alphas = check_alphas(alphas, len(params_list))
    keys = list(params_list[0])
    _check_keys(params_list, "model", keys)
    only = _single(alphas)
    if only is not None:
        return {k: params_list[only][k].detach().clone() for k in keys}
    return {
        k: sum(a * p[k].detach() for a, p in zip(alphas, params_list, strict=True)) for k in keys
    }  # type: ignore[misc]


def mode_imm(
    params_list: Sequence[Params],
    importances: Sequence[Params],
    alphas: Sequence[float],
    eps: float = DEFAULT_EPS,
) -> dict[str, Tensor]:
    """Mode-IMM: θ = (Σ_k α_k F̃_k ⊙ θ_k) / (Σ_k α_k F̃_k) elementwise, F̃_k = F_k + ε F̄
    (module docstring: the guard is relative, so the merge is invariant to a common scale of
    all F_k). A merge with a single nonzero α_k is exactly θ_k (a copy)."""
    if not params_list:
        raise ConfigError("imm: no models to merge")
    if len(importances) != len(params_list):
        raise ConfigError(
            f"imm: {len(importances)} importances for {len(params_list)} models; give one each"
        )
    if not eps > 0:
        raise ConfigError(f"imm: eps must be > 0, got {eps}")
    alphas = check_alphas(alphas, len(params_list))
    keys = list(params_list[0])
    _check_keys(params_list, "model", keys)
    _check_keys(importances, "importance", keys)
    only = _single(alphas)
    if only is not None:
        return {k: params_list[only][k].detach().clone() for k in keys}
    total = sum(float(f[k].detach().double().sum()) for f in importances for k in keys)
    count = sum(f[k].numel() for f in importances for k in keys)
    mean_f = total / count if count else 0.0
    if any(float(f[k].detach().min()) < 0 for f in importances for k in keys):
        raise ConfigError("imm: importances must be >= 0 (squared gradients)")
    guard = eps * (mean_f if mean_f > 0 and math.isfinite(mean_f) else 1.0)
    out: dict[str, Tensor] = {}
    for k in keys:
        num = torch.zeros_like(params_list[0][k], dtype=params_list[0][k].dtype).detach()
        den = torch.zeros_like(num)
        for a, p, f in zip(alphas, params_list, importances, strict=True):
            if a == 0:
                continue
            w = a * (f[k].detach().to(num.dtype) + guard)
            num = num + w * p[k].detach()
            den = den + w
        out[k] = num / den
    return out


def l2_transfer(params: Params, previous: Params, lam: float) -> Tensor:
    """L2-transfer: λ Σ_i (θ_i − θ_{k−1,i})² over every tensor of ``previous`` (eq. 10 of Lee
    et al.; no factor 1/2). ``params`` may hold gradients; ``previous`` is taken as fixed."""
    missing = sorted(set(previous) - set(params))
    if missing:
        raise ConfigError(f"l2-transfer: the model lacks the tensors {missing}")
    terms = [((params[k] - previous[k].detach()) ** 2).sum() for k in previous]
    return lam * torch.stack(terms).sum()


def drop_transfer(
    params: Params, previous: Params, p: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """drop-transfer: θ_eff = θ_{k−1} + m ⊙ (θ − θ_{k−1}) / (1 − p) with a fresh mask
    m ~ Bernoulli(1 − p) per entry, drawn from ``generator`` tensor by tensor in the order of
    ``params`` (module docstring). Differentiable in ``params``; p = 0 gives θ_eff = θ."""
    if not 0 <= p < 1:
        raise ConfigError(f"drop_p: must be >= 0 and < 1, got {p}")
    out: dict[str, Tensor] = {}
    for k, theta in params.items():
        prev = previous[k].detach()
        mask = torch.empty_like(theta, dtype=theta.dtype).bernoulli_(1.0 - p, generator=generator)
        out[k] = prev + mask * (theta - prev) / (1.0 - p)
    return out


def shares(step: float) -> list[float]:
    """The swept shares s of the last task: 0, step, 2 step, ..., 1 (1 always included),
    rounded to 12 digits so that 0.01 steps read 0.07, not 0.07000000000000001."""
    if not step > 0:
        raise ConfigError(f"alpha_step: must be > 0, got {step}")
    n = max(1, math.ceil(1.0 / step - 1e-9))
    return [round(min(1.0, i * step), 12) for i in range(n)] + [1.0]


def share_alphas(n_tasks: int, share: float) -> list[float]:
    """The weights α of a merge of ``n_tasks`` models where the last task has ``share`` and the
    others split the rest evenly: α_T = s, α_k = (1 − s) / (T − 1). With T = 2, α_2 = s."""
    if n_tasks < 2:
        raise ConfigError(f"imm: a merge needs at least two models, got {n_tasks}")
    rest = (1.0 - share) / (n_tasks - 1)
    return [rest] * (n_tasks - 1) + [share]


__all__ = [
    "DEFAULT_EPS",
    "check_alphas",
    "drop_transfer",
    "l2_transfer",
    "mean_imm",
    "mode_imm",
    "share_alphas",
    "shares",
]
