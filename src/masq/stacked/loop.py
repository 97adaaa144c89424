"""K re-training runs from one state, trained at once (:mod:`masq.stacked`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from masq.config import EvalSchedule, Precision, choice
from masq.curves import Curve
from masq.errors import ConfigError
from masq.scenarios import head_bias
from masq.stacked.adam import StackedAdam
from masq.stacked.model import (
    StackedMLP,
    Workspace,
    loss_grads,
    stack_states,
    stacked_accuracies,
    stored_layout,
    unstack,
)
from masq.tasks import XY
from masq.training import AdamMoments, eval_iterations, heartbeat
from masq.training.loop import phase_indices


def lam_importance(
    model: StackedMLP, lams: Sequence[float], importances: Sequence[Mapping[str, Tensor]]
) -> list[Tensor] | None:
    """λ_k F_k per parameter in the stacked layout (zeros for λ_k = 0 or no importance);
    None when every λ_k F_k is zero. Keys of a non-empty F must match the model's."""
    if not any(lam > 0 and imp for lam, imp in zip(lams, importances, strict=True)):
        return None
    out = [torch.zeros_like(p) for p in model.params]
    for run, (lam, imp) in enumerate(zip(lams, importances, strict=True)):
        if not imp or lam == 0:
            continue
        if set(imp) != set(model.keys):
            raise ConfigError(
                f"stacked: importance keys {sorted(imp)} do not match the model's {model.keys}; "
                "compute the importance on this D1 state"
            )
        for i, key in enumerate(model.keys):
            f = stored_layout(imp[key].to(device=out[i].device, dtype=torch.float32))
            if f.shape != out[i][run].shape:
                raise ConfigError(
                    f"stacked: importance of {key!r} has shape {tuple(imp[key].shape)}, "
                    "not that of the parameter"
                )
            out[i][run] = lam * f
    return out


def stacked_anchors(
    model: StackedMLP,
    starts: Sequence[Mapping[str, Tensor]],
    anchors: Sequence[Mapping[str, Tensor] | None] | None,
    device: torch.device,
) -> list[Tensor]:
    """θ* per parameter in the stacked layout: [1, ...] (the one start state, shared by every
    run) when no run has its own anchor, else [K, ...] (run k's anchor, or the start state
    where it has none); one start state is needed for the shared default."""
    own = list(anchors) if anchors is not None else [None] * model.k
    if len(own) != model.k:
        raise ConfigError(f"stacked: give one anchor (or None) per run (K = {model.k})")

    def layout(state: Mapping[str, Tensor], key: str) -> Tensor:
        return stored_layout(state[key].detach().to(device, torch.float32))

    if all(a is None for a in own):
        if len(starts) != 1:
            raise ConfigError("stacked: runs from K start states need their anchors; give them")
        return [layout(starts[0], key).unsqueeze(0).contiguous() for key in model.keys]
    out = []
    for key in model.keys:
        rows = []
        for run, a in enumerate(own):
            state = a if a is not None else starts[0 if len(starts) == 1 else run]
            if set(state) != set(model.keys):
                raise ConfigError(
                    f"stacked: anchor keys {sorted(state)} do not match the model's {model.keys}"
                )
            rows.append(layout(state, key))
        out.append(torch.stack(rows).contiguous())
    return out


def train_stacked(
    state_dict: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    train: XY,
    *,
    lrs: Sequence[float],
    lams: Sequence[float],
    importances: Sequence[Mapping[str, Tensor]],
    iters: int,
    batch_size: int,
    eval_every: int,
    seed: int,
    eval_sets: Mapping[str, XY] | None = None,
    unions: Mapping[str, Sequence[str]] | None = None,
    device: torch.device | None = None,
    eval_schedule: EvalSchedule | str = EvalSchedule.EVERY,
    precision: Precision | str = Precision.FP32,
    units: Sequence[int] | None = None,
    eval_units: Mapping[str, Sequence[int]] | None = None,
    anchors: Sequence[Mapping[str, Tensor] | None] | None = None,
    adam: Sequence[AdamMoments] | None = None,
    adam_out: list[AdamMoments] | None = None,
) -> tuple[list[Curve], list[dict[str, Tensor]]]:
    """Re-train K = len(lrs) copies of ``state_dict`` on ``train`` at once (module docstring);
    ``state_dict`` may also be K states, run k starting from the k-th (a later phase of T-task
    runs).

    Run k: Adam at ``lrs[k]``, penalty (λ_k/2) Σ F_k (θ − θ*_k)² with F_k = ``importances[k]``
    ({} for none) and θ*_k = ``anchors[k]`` (default, or None: the common start state, which
    one start state requires); mini-batches from ``Generator().manual_seed(seed)``
    as :func:`masq.training.train_task`, evaluated at the same :func:`eval_iterations`;
    ``precision`` "bf16" runs the matmuls in bfloat16 (float32 master weights, Adam state and
    penalty). ``units`` and ``eval_units`` mask the other tasks' output units in the loss and
    per evaluation set (task-incremental), as :func:`masq.training.train_task`'s. ``adam``:
    run k's Adam starts from ``adam[k]`` (``adam_state`` keep) instead of a fresh state, and
    ``adam_out`` (a list) receives each run's Adam state at the end. Returns (K curves as
    train_task's, K final state dicts).
    """
    dtype = (
        torch.bfloat16
        if choice(Precision, precision, "precision") == Precision.BF16
        else (torch.float32)
    )
    k = len(lrs)
    if not (len(lams) == len(importances) == k) or k == 0:
        raise ConfigError("stacked: give one lr, one lam and one importance per run (K >= 1)")
    device = torch.device("cpu") if device is None else torch.device(device)
    starts = [state_dict] if isinstance(state_dict, Mapping) else list(state_dict)
    if len(starts) not in (1, k):
        raise ConfigError(
            f"stacked: give one start state or one per run (K = {k}), not {len(starts)}"
        )
    model = stack_states(starts * k if len(starts) == 1 else starts, device)
    stars = stacked_anchors(model, starts, anchors, device)
    lam_f = lam_importance(model, lams, importances)
    penalized = [lam > 0 and bool(imp) for lam, imp in zip(lams, importances, strict=True)]
    optimizer = StackedAdam.create(model, lrs)
    if adam is not None:
        optimizer.load(model, adam)
    x, y = train[0].to(device), train[1].to(device)
    sets = {name: (a.to(device), b.to(device)) for name, (a, b) in (eval_sets or {}).items()}
    unions = dict(unions or {})
    names = [*sets, *unions]
    curves: list[Curve] = [{"iteration": [], **{n: [] for n in names}} for _ in range(k)]
    record_at = set(eval_iterations(iters, eval_every, eval_schedule)) if sets else set()

    def record(it: int) -> None:
        accs = stacked_accuracies(model, sets, unions, dtype, eval_units)
        for curve, acc in zip(curves, accs, strict=True):
            curve["iteration"].append(it)
            for n in names:
                curve[n].append(acc[n])

    if 0 in record_at:
        record(0)
    generator = torch.Generator().manual_seed(seed)
    workspace = Workspace.create(model, batch_size, dtype)
    bias = head_bias(units, model.params[-1].shape[-1], device)
    order = phase_indices(x.shape[0], batch_size, iters, generator).to(device)
    for it, idx in enumerate(order, start=1):
        grads = loss_grads(model, workspace, x[idx], y[idx], bias)
        optimizer.step(model.params, grads, lam_f, stars, penalized)
        if it in record_at:
            record(it)
        heartbeat.beat()
    if adam_out is not None:
        adam_out[:] = [optimizer.moments(model, run) for run in range(k)]
    return curves, [unstack(model, run) for run in range(k)]
