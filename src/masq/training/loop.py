"""Training on one task: a curve out.

The batched (stacked) re-training of :mod:`masq.stacked` reuses :func:`minibatch_indices`
and :mod:`masq.training.evaluate`, so K stacked runs see exactly the mini-batches and
evaluation points of K separate :func:`train_task` calls.

The loop, written out (the paper's protocol)::

    optimizer = Adam(model.parameters(), lr)           # fresh state for every task
    for it, idx in enumerate(minibatch_indices(...), start=1):
        loss = cross_entropy(model(x[idx]), y[idx])    # mean over the mini-batch
        if penalty is not None:
            loss = loss + penalty(model)               # e.g. the EWC term, added visibly
        loss.backward(); optimizer.step()
        if it in eval_iterations(...): record accuracies on the evaluation sets

Evaluation costs as much as 18-30 training iterations per 10,000 images
(:mod:`masq.training.evaluate`); pass a smaller ``eval_every`` (down to 1, the paper's
"after every mini-batch") for finer curves, at that cost.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.torch_version import TorchVersion
from tqdm.auto import tqdm

from masq.config import EvalSchedule, Precision, choice
from masq.curves import Curve
from masq.errors import ConfigError
from masq.scenarios import head_bias
from masq.tasks import XY
from masq.training import heartbeat
from masq.training.evaluate import (
    DEFAULT_EVAL_EVERY,
    accuracies,
    autocast,
    eval_counts,
    eval_iterations,
    model_device,
)


@dataclass(frozen=True)
class TrainConfig:
    """One task's training: Adam (fresh state) at ``lr``, ``iters`` mini-batches of
    ``batch_size`` drawn without replacement and reshuffled each epoch from a generator
    seeded by ``seed``; evaluation at :func:`eval_iterations` of ``eval_schedule`` (every
    ``eval_every`` iterations by default, and at 0 and the end); forward and backward in
    ``precision`` (bf16: bfloat16 matmuls, float32 weights, loss and Adam state)."""

    lr: float = 1e-3
    iters: int = 5000
    batch_size: int = 100
    eval_every: int = DEFAULT_EVAL_EVERY
    seed: int = 0
    eval_schedule: EvalSchedule = EvalSchedule.EVERY
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        for name in ("lr", "iters", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        object.__setattr__(
            self, "eval_schedule", choice(EvalSchedule, self.eval_schedule, "eval_schedule")
        )
        object.__setattr__(self, "precision", choice(Precision, self.precision, "precision"))


def minibatch_indices(
    n: int, batch_size: int, iters: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """``iters`` index tensors of exactly ``batch_size`` entries each.

    The index stream is the concatenation of epochs, each a fresh ``randperm(n, generator)``
    drawn when the previous one is used up, cut into consecutive batches of ``batch_size``.
    A batch that straddles two epochs takes the rest of the old permutation and the start of
    the new one (as TensorFlow's ``next_batch``), so no sample is dropped, every epoch visits
    each index exactly once and every batch has the same size.
    """
    if n <= 0 or batch_size <= 0 or iters < 0:
        raise ConfigError(
            f"minibatch_indices: need n > 0, batch_size > 0, iters >= 0 "
            f"(got {n}, {batch_size}, {iters})"
        )
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(iters):
        parts: list[Tensor] = []
        need = batch_size
        while need > 0:
            if pos == n:
                perm = torch.randperm(n, generator=generator)
                pos = 0
            take = min(need, n - pos)
            parts.append(perm[pos : pos + take])
            pos += take
            need -= take
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


def phase_indices(n: int, batch_size: int, iters: int, generator: torch.Generator) -> Tensor:
    """The whole index stream of a phase, ``[iters, batch_size]`` int64: row t is the t-th
    batch of :func:`minibatch_indices`. Moved to the run's device once, it spares CUDA a
    host-to-device copy (and a synchronisation) per iteration."""
    rows = list(minibatch_indices(n, batch_size, iters, generator))
    if not rows:
        return torch.empty(0, batch_size, dtype=torch.int64)
    return torch.stack(rows)


def fused_adam_available(device: torch.device) -> bool:
    """Whether this torch has the fused Adam kernel for ``device`` (CUDA; CPU from torch 2.4)."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    # TorchVersion (a str to mypy) compares with tuples: torch sets its comparisons at runtime
    return device.type == "cuda" or (
        device.type == "cpu" and TorchVersion(torch.__version__) >= (2, 4)  # type: ignore[operator]
    )


def make_adam(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """Adam with PyTorch's defaults (betas 0.9, 0.999, eps 1e-8, as TensorFlow 1's), fresh state.

    Uses the fused kernel where this torch has it for the device (CUDA; CPU from torch 2.4):
    the same update rule, about twice as fast a step on the CPU for 784-800-800-10.
    """
    params = list(params)
    fused = bool(params) and all(fused_adam_available(p.device) for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


@dataclass(frozen=True)
class AdamMoments:
    """Adam's state between tasks (``adam_state`` keep): the step count t and, per parameter
    name, the first and second moment estimates m and v (CPU copies), so that the next task's
    first step is Adam's step t + 1: m ← β1 m + (1 − β1) g, v ← β2 v + (1 − β2) g²,
    θ ← θ − lr · (m / (1 − β1^{t+1})) / (√(v / (1 − β2^{t+1})) + ε)."""

    step: int
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


def adam_moments(optimizer: torch.optim.Optimizer, model: nn.Module) -> AdamMoments:
    """The state of ``optimizer`` (an Adam over ``model``'s parameters) by parameter name, on
    the CPU; a one-line ConfigError for a parameter it has not stepped."""
    step, exp_avg, exp_avg_sq = None, {}, {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            raise ConfigError(
                f"adam state: parameter {name!r} has no Adam state; train a phase before reading it"
            )
        step = int(float(state["step"])) if step is None else step
        exp_avg[name] = state["exp_avg"].detach().to("cpu", copy=True)
        exp_avg_sq[name] = state["exp_avg_sq"].detach().to("cpu", copy=True)
    return AdamMoments(step or 0, exp_avg, exp_avg_sq)


def load_adam_moments(
    optimizer: torch.optim.Optimizer, model: nn.Module, moments: AdamMoments
) -> None:
    """Give ``optimizer`` (an Adam over ``model``'s parameters, not yet stepped) the state
    ``moments``: its next step is step ``moments.step + 1`` with those m and v. A one-line
    ConfigError where the names or shapes do not match the model."""
    named = dict(model.named_parameters())
    if set(named) != set(moments.exp_avg) or set(named) != set(moments.exp_avg_sq):
        raise ConfigError(
            f"adam state: the moments hold {sorted(moments.exp_avg)[:4]}, the model has "
            f"{sorted(named)[:4]}; carry the state of a model of this architecture"
        )
    # the step as Adam keeps it: a float tensor, on the device for the fused kernel
    on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    for name, p in named.items():
        m, v = moments.exp_avg[name], moments.exp_avg_sq[name]
        if m.shape != p.shape or v.shape != p.shape:
            raise ConfigError(
                f"adam state: moments of {name!r} have shape {tuple(m.shape)}, the parameter "
                f"{tuple(p.shape)}; carry the state of a model of this architecture"
            )
        optimizer.state[p] = {
            "step": torch.tensor(
                float(moments.step),
                dtype=torch.float64
                if torch.get_default_dtype() == torch.float64
                else torch.float32,
                device=p.device if on_device else None,
            ),
            "exp_avg": m.to(p.device, p.dtype, copy=True),
            "exp_avg_sq": v.to(p.device, p.dtype, copy=True),
        }


def unit_bias_rows(
    unit_sets: Sequence[Sequence[int]], n: int, device: torch.device | str | None = None
) -> Tensor:
    """float32 [S, n]: row s is :func:`masq.scenarios.head_bias` of ``unit_sets[s]`` (0 on
    its units, −inf elsewhere), so ``rows[index]`` is a per-sample [B, n] bias for logits."""
    if not unit_sets:
        raise ConfigError("sample units: unit_sets is empty; give one unit list per task")
    out = []
    for units in unit_sets:
        row = head_bias(units, n, device)
        if row is None:
            raise ConfigError("sample units: a unit set is None; give every task its units")
        out.append(row)
    return torch.stack(out)


def check_sample_units(
    n: int,
    units: Sequence[int] | None,
    sample_units: Tensor | None,
    unit_sets: Sequence[Sequence[int]] | None,
) -> None:
    """A one-line ConfigError unless ``sample_units`` and ``unit_sets`` are both given or
    neither, not with ``units``, and ``sample_units`` is an int64 [n] index into
    ``unit_sets``."""
    if sample_units is None and unit_sets is None:
        return
    if sample_units is None or unit_sets is None:
        raise ConfigError("train: give sample_units and unit_sets together, or neither")
    if units is not None:
        raise ConfigError("train: give units (one task) or sample_units (per sample), not both")
    if sample_units.dtype != torch.int64 or tuple(sample_units.shape) != (n,):
        raise ConfigError(
            f"train: sample_units must be int64 [{n}] (one set index per sample), got "
            f"{sample_units.dtype} {tuple(sample_units.shape)}"
        )
    if n and not (0 <= int(sample_units.min()) and int(sample_units.max()) < len(unit_sets)):
        raise ConfigError(
            f"train: sample_units must index unit_sets (0..{len(unit_sets) - 1}); "
            "fix the per-sample task index"
        )


def finite_parameters(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (one reduction and sync per tensor)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def diverged_text(desc: str, it: int, iters: int, loss: float) -> str:
    """The one line that says a phase diverged: where, at which check, what to try."""
    return (
        f"{desc}: the loss is {loss} at iteration {it} of {iters} (checked at every evaluation "
        "and at the end of the phase): the run diverged and is recorded as diverged; a smaller "
        "learning rate or λ usually helps"
    )


def say_diverged(bar: Any, text: str) -> None:
    """``masq: warning: <text>`` as one line on stderr in one write (a stream that shows a
    progress bar's last state per line, as ``masq run --quiet`` does, keeps it whole), the
    bar cleared first so that the line does not run on from it; the bar redraws itself."""
    bar.clear()
    sys.stderr.write(f"masq: warning: {text}\n")
    sys.stderr.flush()


def train_task(
    model: nn.Module,
    train: XY,
    config: TrainConfig,
    *,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    penalty_grad: Callable[[nn.Module], None] | None = None,
    eval_sets: Mapping[str, XY] | None = None,
    unions: Mapping[str, Sequence[str]] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "train",
    units: Sequence[int] | None = None,
    eval_units: Mapping[str, Sequence[int]] | None = None,
    step_hook: Callable[[nn.Module], None] | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
    sample_units: Tensor | None = None,
    unit_sets: Sequence[Sequence[int]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Curve:
    """Train ``model`` in place: loss = cross_entropy(model(x), y) + penalty(model).

    ``optimizer``: the optimizer to step (its state carries over between calls: ``adam_state``
    keep), its learning rate set to ``config.lr``; default a fresh Adam (:func:`make_adam`)
    over ``model``'s parameters.

    ``penalty_grad(model)``, if given, is called after ``loss.backward()`` to add a penalty's
    gradient to the parameters' ``.grad`` directly (e.g.
    :class:`masq.consolidation.QuadraticPenalty`, the EWC term without autograd);
    ``step_hook(model)`` after every optimizer step (``.grad`` still holds that step's
    gradient: a measure accumulated during training). ``grad_hook(model)`` is called right
    after the backward pass of the task loss alone, before ``penalty_grad`` adds to ``.grad``
    (then ``.grad`` = ∇ CE of the mini-batch: SI's path integral reads it); with ``grad_hook``
    an autograd ``penalty`` is backpropagated separately, after the hook. ``units``
    (task-incremental: the task's output units) masks the other units' logits in the loss,
    CE(logits + head_bias(units), y); ``eval_units`` does so per evaluation set.

    Per-sample units (joint training over several task-incremental tasks): sample n of
    ``train`` uses the units ``unit_sets[sample_units[n]]`` (``sample_units``: int64 [N], an
    index into ``unit_sets``, usually the sample's task), i.e. the loss of a mini-batch is
    CE(logits + B, y) with row b of B the head bias (0 on the units, −inf elsewhere) of its
    sample's set (:func:`unit_bias_rows`). Give both or neither, and not with ``units``.

    Returns the curve {"iteration": [...], set or union name: [accuracy, ...]} recorded at
    :func:`eval_iterations` (iteration 0 is before the first step; an evaluation at ``it``
    follows that iteration's optimizer step). Without ``eval_sets`` the curve is empty.
    ``device`` defaults to the model's; the model and the data are moved there.

    Divergence: at every evaluation point and at the last iteration (not every step: no host
    sync is added to the others) the mini-batch loss is checked; the first non-finite one
    prints one line ``masq: warning: <desc>: the loss is nan at iteration N ...`` on stderr,
    once per run: a phase that starts from non-finite weights (a run that diverged in an
    earlier phase, already reported) says nothing.
    """
    device = model_device(model) if device is None else torch.device(device)
    model.to(device)
    x, y = train[0].to(device), train[1].to(device)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(
            f"train: need as many labels as inputs, and some (got {x.shape[0]}, {y.shape[0]})"
        )
    check_sample_units(x.shape[0], units, sample_units, unit_sets)
    sample_set = None if sample_units is None else sample_units.to(device)
    sets = {k: (a.to(device), b.to(device)) for k, (a, b) in (eval_sets or {}).items()}
    unions = dict(unions or {})
    names = [*sets, *unions]
    curve: Curve = {"iteration": [], **{k: [] for k in names}}
    record_at = (
        set(eval_iterations(config.iters, config.eval_every, config.eval_schedule))
        if sets
        else set()
    )

    check_at = record_at | {config.iters}  # where the loss's finiteness is checked
    watch = finite_parameters(model)  # diverged in an earlier phase: reported there
    bar = tqdm(total=config.iters, desc=desc, unit="it", disable=not progress, dynamic_ncols=True)

    def record(it: int) -> None:
        counts = eval_counts(model, sets, precision=config.precision, units=eval_units)
        acc = accuracies(counts, unions)
        curve["iteration"].append(it)
        for k in names:
            curve[k].append(acc[k])
        if progress:
            shown = names[-1]
            bar.set_postfix_str(f"{shown} {acc[shown]:.4f}", refresh=False)

    bias: Tensor | None = None  # the head bias of ``units``, made at the first step
    rows: Tensor | None = None  # the head-bias rows of ``unit_sets``, made at the first step
    if optimizer is None:
        optimizer = make_adam(model.parameters(), config.lr)
    else:
        for group in optimizer.param_groups:
            group["lr"] = config.lr
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    try:
        if 0 in record_at:
            record(0)
        order = phase_indices(x.shape[0], config.batch_size, config.iters, generator).to(device)
        for it, idx in enumerate(order, start=1):
            with autocast(device, config.precision):
                logits = model(x[idx])
            logits = logits.float()
            if units is not None:
                if bias is None:
                    bias = head_bias(units, logits.shape[1], device)
                logits = logits + bias
            elif sample_set is not None and unit_sets is not None:
                if rows is None:
                    rows = unit_bias_rows(unit_sets, logits.shape[1], device)
                logits = logits + rows[sample_set[idx]]
            loss = F.cross_entropy(logits, y[idx])
            if penalty is not None and grad_hook is None:
                loss = loss + penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_hook is not None:
                grad_hook(model)  # .grad = the task loss's gradient alone
                if penalty is not None:
                    penalty(model).backward()  # accumulates into .grad
            if penalty_grad is not None:
                penalty_grad(model)
            optimizer.step()
            if step_hook is not None:
                step_hook(model)
            if watch and it in check_at and not math.isfinite(value := float(loss.detach())):
                say_diverged(bar, diverged_text(desc, it, config.iters, value))
                watch = False
            if it in record_at:
                record(it)
            bar.update(1)
            heartbeat.beat()
    finally:
        bar.close()
    return curve
