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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from masq.config import FIRST_FIELDS, RunConfig, Transfer
from masq.consolidation.ewc import Anchor
from masq.consolidation.penalty import QuadraticPenalty
from masq.consolidation.registry import EndResult, Method, PhaseContext, PhasePlan, register_method
from masq.curves import VAL, task_name, union_name
from masq.errors import ConfigError
from masq.importance import Importance, Measure

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
    # a Tensor: sum of at least one term (check_alphas: one α per model, and there is one)
    return {
        k: cast(Tensor, sum(a * p[k].detach() for a, p in zip(alphas, params_list, strict=True)))
        for k in keys
    }


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


# The most points an α sweep may have: each point merges the T solutions and evaluates the
# merged net on every task's test and validation set (about a full evaluation pass each), so
# 10,001 points (--alpha-step 1e-4) already cost hours at the paper's sizes; a smaller step is
# a typo (1e-9 would build a list of a billion shares before evaluating any).
MAX_ALPHA_POINTS = 10_001


def check_alpha_step(step: float) -> int:
    """The number of shares of the sweep at ``step`` (0, step, ..., 1); a one-line ConfigError
    naming --alpha-step when ``step`` is not > 0 or the sweep would exceed
    :data:`MAX_ALPHA_POINTS` (checked before anything is allocated or trained)."""
    if not step > 0 or not math.isfinite(step):
        raise ConfigError(f"alpha_step: must be a finite number > 0, got {step}")
    n = max(1, math.ceil(1.0 / step - 1e-9)) + 1
    if n > MAX_ALPHA_POINTS:
        raise ConfigError(
            f"alpha_step: {step:g} gives a sweep of {n:,} merges, above the limit of "
            f"{MAX_ALPHA_POINTS:,}; give --alpha-step {1 / (MAX_ALPHA_POINTS - 1):g} or more"
        )
    return n


def shares(step: float) -> list[float]:
    """The swept shares s of the last task: 0, step, 2 step, ..., 1 (1 always included),
    rounded to 12 digits so that 0.01 steps read 0.07, not 0.07000000000000001; at most
    :data:`MAX_ALPHA_POINTS` of them (:func:`check_alpha_step`)."""
    n = check_alpha_step(step) - 1
    return [round(min(1.0, i * step), 12) for i in range(n)] + [1.0]


def share_alphas(n_tasks: int, share: float) -> list[float]:
    """The weights α of a merge of ``n_tasks`` models where the last task has ``share`` and the
    others split the rest evenly: α_T = s, α_k = (1 − s) / (T − 1). With T = 2, α_2 = s."""
    if n_tasks < 2:
        raise ConfigError(f"imm: a merge needs at least two models, got {n_tasks}")
    rest = (1.0 - share) / (n_tasks - 1)
    return [rest] * (n_tasks - 1) + [share]


# ----------------------------------------------------------------------------- the methods

SHARE = "share"  # the sweep's axis: α of the last task
POINTS: tuple[tuple[str, str], ...] = (
    ("val_selected", "merged_val"),
    ("test_best", "merged"),
    ("uniform", "merged_uniform"),
)


def drop_stream(phase: int) -> str:
    """The drop-transfer mask stream of phase ``phase`` (0-based): "d2-drop", ..."""
    return f"d{phase + 1}-drop"


class DropTransferNet(nn.Module):
    """``net`` trained with drop-transfer towards ``previous``: in training mode the forward
    pass uses θ_eff = θ_prev + m ⊙ (θ − θ_prev) / (1 − p) with a fresh mask per call (from
    ``generator``); in eval mode it is ``net`` itself. Its parameters are ``net``'s."""

    def __init__(
        self, net: nn.Module, previous: Mapping[str, Tensor], p: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.net = net
        self.p = float(p)
        self.previous = dict(previous)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return cast(Tensor, self.net(x))
        params = dict(self.net.named_parameters())
        effective = drop_transfer(params, self.previous, self.p, self.generator)
        return cast(Tensor, functional_call(self.net, effective, (x,)))


def sweep_shares(alpha_step: float, n_tasks: int) -> list[float]:
    """The shares s of the last task to evaluate: :func:`shares` of ``alpha_step`` and, for
    T > 2, the uniform 1/T."""
    values = shares(alpha_step)
    if n_tasks > 2:
        values = sorted({*values, 1.0 / n_tasks})
    return values


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value (NaNs ignored; the earliest on ties)."""
    finite = [i for i, v in enumerate(values) if not math.isnan(v)] or list(range(len(values)))
    return max(finite, key=lambda i: (values[i], -i))


def sweep_points(sweep: Mapping[str, Sequence[float]], n_tasks: int) -> dict[str, dict[str, float]]:
    """The labelled points of a sweep: "val_selected" (max of the validation union),
    "test_best" (max of the test union), "uniform" (share 1/T, or the nearest share)."""
    union = union_name(n_tasks)
    values = sweep[SHARE]
    uniform = min(range(len(values)), key=lambda i: abs(values[i] - 1.0 / n_tasks))
    index = {
        "val_selected": argmax(sweep[VAL + union]),
        "test_best": argmax(sweep[union]),
        "uniform": uniform,
    }
    return {label: {k: v[i] for k, v in sweep.items()} for label, i in index.items()}


def imm_metrics(points: Mapping[str, Mapping[str, float]], n_tasks: int) -> dict[str, float]:
    """The scalars of the labelled points: ``merged_val.*`` (val-selected α), ``merged.*``
    (test-best α), ``merged_uniform.*``, each with ``.union``, ``.D1``... and ``.alpha``, plus
    ``merged_val.val_union``."""
    union = union_name(n_tasks)
    out: dict[str, float] = {}
    for label, prefix in POINTS:
        p = points[label]
        out[f"{prefix}.union"] = p[union]
        out |= {f"{prefix}.{task_name(j)}": p[task_name(j)] for j in range(n_tasks)}
        out[f"{prefix}.alpha"] = p[SHARE]
    out["merged_val.val_union"] = points["val_selected"][VAL + union]
    return out


@dataclass
class IMMState:
    """The solutions θ_1..θ_t (CPU state dicts) and, for mode-IMM, their importances."""

    states: list[dict[str, Tensor]] = field(default_factory=list)
    importances: list[dict[str, Tensor]] = field(default_factory=list)


class MeanIMM(Method):
    """Mean-IMM (Lee et al. 2017): train on (weight transfer, optionally L2- and/or
    drop-transfer towards θ_{t−1}), then merge θ = Σ_k α_k θ_k, swept over the share s of the
    last task (α_T = s, the others (1 − s)/(T − 1)) and, for T > 2, the uniform α = 1/T; each
    merge is evaluated on every task's test and validation set and their unions. The record
    gets ``imm``: the sweep and the points "val_selected", "test_best" and "uniform"."""

    name = "mean-imm"
    family = "IMM"
    fields = ("transfer", "alpha_step", "transfer_lam", "drop_p")
    record_key = "imm"
    description = "train on, then merge θ = Σ α_k θ_k (Lee et al. 2017)"
    display: ClassVar[str] = "mean-IMM"
    eps: ClassVar[float | None] = None  # the merge's relative guard (mode-IMM's only)

    def reads(self, config: RunConfig) -> tuple[str, ...]:
        l2 = config.transfer in (Transfer.L2, Transfer.L2_DROP)
        drop = config.transfer in (Transfer.DROP, Transfer.L2_DROP)
        return ("transfer", "alpha_step", *(("transfer_lam",) if l2 else ()),
                *(("drop_p",) if drop else ()))  # fmt: skip

    def label(self, values: Mapping[str, Any], measure: Measure, detailed: bool) -> str:
        label = self.display
        if self.eps is not None and measure.gives_importance:
            label += "+" + measure.text(values, detailed)
        transfer = str(values.get("transfer", Transfer.WEIGHT.value))
        parts = []
        if transfer in (Transfer.L2, Transfer.L2_DROP):
            parts.append(f"L2 λ={float(values['transfer_lam']):g}")
        if transfer in (Transfer.DROP, Transfer.L2_DROP):
            parts.append(f"drop p={float(values['drop_p']):g}")
        return label + (", " + " + ".join(parts) if parts else "")

    def canonical(self, config: RunConfig) -> dict[str, Any]:
        return {"importance": "none"}  # mean-IMM merges without an importance

    def check(self, config: RunConfig, measure: Measure) -> None:
        check_alpha_step(config.alpha_step)  # before training: the sweep's size

    def init(self, config: RunConfig) -> IMMState:
        return IMMState()

    def before_phase(
        self, config: RunConfig, state: IMMState, model: nn.Module, phase: int, ctx: PhaseContext
    ) -> PhasePlan:
        previous = {k: v.detach().clone() for k, v in model.named_parameters()}
        penalty = None
        if config.transfer in (Transfer.L2, Transfer.L2_DROP):  # λ_T Σ (θ − θ_prev)²
            ones = {k: torch.ones_like(v) for k, v in previous.items()}
            penalty = QuadraticPenalty(model, Anchor(previous, ones), 2.0 * config.transfer_lam)
        wrap = None
        if config.transfer in (Transfer.DROP, Transfer.L2_DROP):
            generator = torch.Generator(device=ctx.device)
            generator.manual_seed(ctx.seed(drop_stream(phase)))

            def wrap(net: nn.Module) -> nn.Module:
                return DropTransferNet(net, previous, config.drop_p, generator)

        return PhasePlan(penalty=penalty, wrap=wrap)

    def after_phase(
        self,
        config: RunConfig,
        state: IMMState,
        model: nn.Module,
        importance: Importance | None,
        phase: int,
    ) -> IMMState:
        solution = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        imps = state.importances if importance is None else [*state.importances, dict(importance)]
        return IMMState([*state.states, solution], imps)

    def merge(
        self,
        states: Sequence[Params],
        importances: Sequence[Params],
        alphas: Sequence[float],
    ) -> dict[str, Tensor]:
        """The merged parameters at weights ``alphas``."""
        return mean_imm(states, alphas)

    def end(self, config: RunConfig, state: IMMState, ctx: PhaseContext) -> EndResult:
        start = time.perf_counter()
        on_device = [{k: v.to(ctx.device) for k, v in s.items()} for s in state.states]
        imps = [{k: v.to(ctx.device) for k, v in f.items()} for f in state.importances]
        values = sweep_shares(config.alpha_step, config.n_tasks)
        sweep: dict[str, list[float]] = {SHARE: [float(s) for s in values]}
        for s in values:
            merged = self.merge(on_device, imps, share_alphas(len(on_device), s))
            for name, value in ctx.evaluate(merged).items():
                sweep.setdefault(name, []).append(value)
        seconds = time.perf_counter() - start
        points = sweep_points(sweep, config.n_tasks)
        record = {
            "method": self.name,
            "eps": self.eps,
            "sweep": sweep,
            **points,
        }
        return EndResult(imm_metrics(points, config.n_tasks), record, seconds)

    def shared_training(self, config: RunConfig) -> tuple[Any, ...]:
        """Runs that differ only in the merge (mean/mode, importance, α grid) train alike:
        the task-1 fields, lr2, iters2 and the transfer with the parameters it uses."""
        l2 = config.transfer in (Transfer.L2, Transfer.L2_DROP)
        drop = config.transfer in (Transfer.DROP, Transfer.L2_DROP)
        return (
            *(getattr(config, f) for f in FIRST_FIELDS),
            config.lr2,
            config.iters2,
            config.transfer.value,
            config.transfer_lam if l2 else None,
            config.drop_p if drop else None,
        )


class ModeIMM(MeanIMM):
    """Mode-IMM (Lee et al. 2017): as :class:`MeanIMM`, merging θ = Σ_k α_k F̃_k θ_k /
    Σ_k α_k F̃_k with F_k the importance of task k at θ_k (:func:`mode_imm`)."""

    name = "mode-imm"
    description = "train on, then merge θ = Σ α_k F_k θ_k / Σ α_k F_k (Lee et al. 2017)"
    display = "mode-IMM"
    eps = DEFAULT_EPS

    def canonical(self, config: RunConfig) -> dict[str, Any]:
        return {}

    def check(self, config: RunConfig, measure: Measure) -> None:
        super().check(config, measure)
        if not measure.gives_importance:
            raise ConfigError(
                "consolidation mode-imm needs an importance; use --importance fisher or masq "
                "(or --consolidation mean-imm)"
            )
        if measure.kind != "diagonal":
            raise ConfigError(
                f"consolidation mode-imm merges with a diagonal importance; {measure.name!r} is "
                f"structured ({measure.kind}): use --importance fisher, masq or mas"
            )

    def wants_importance(self, config: RunConfig, phase: int) -> bool:
        return True

    def merge(
        self,
        states: Sequence[Params],
        importances: Sequence[Params],
        alphas: Sequence[float],
    ) -> dict[str, Tensor]:
        return mode_imm(states, importances, alphas, eps=DEFAULT_EPS)


MEAN_IMM = register_method(MeanIMM())
MODE_IMM = register_method(ModeIMM())


__all__ = [
    "DEFAULT_EPS",
    "MAX_ALPHA_POINTS",
    "MEAN_IMM",
    "MODE_IMM",
    "POINTS",
    "SHARE",
    "DropTransferNet",
    "IMMState",
    "MeanIMM",
    "ModeIMM",
    "argmax",
    "check_alpha_step",
    "check_alphas",
    "drop_stream",
    "drop_transfer",
    "imm_metrics",
    "l2_transfer",
    "mean_imm",
    "mode_imm",
    "share_alphas",
    "shares",
    "sweep_points",
    "sweep_shares",
]
