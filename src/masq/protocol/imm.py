"""The IMM protocol for T tasks (Lee et al. 2017, "Overcoming catastrophic forgetting by
incremental moment matching", NeurIPS): train on, then merge.

1. Task 1 at lr1 for iters1 (the task-1 state a grid shares with EWC runs).
2. Every later task t at lr2 for iters2, starting from θ_{t−1} ("weight transfer"); with
   ``transfer`` = l2 / l2-drop the gradient of λ_T Σ (θ − θ_{t−1})² is added (L2-transfer,
   λ_T = ``transfer_lam``), with drop / l2-drop training sees
   θ_eff = θ_{t−1} + m ⊙ (θ − θ_{t−1}) / (1 − p), m ~ Bernoulli(1 − p) per entry and step
   (drop-transfer, p = ``drop_p``; evaluation uses θ). Formulas: :mod:`masq.consolidation.imm`.
3. mode-IMM: the importance F_t (``importance``: FIM or MaSQ) of each task on its own
   training data at its solution θ_t (task 1's is the one a grid caches).
4. The merge, swept over the weights α without any training: for T = 2 over α_2 = s in
   {0, step, ..., 1} (α_1 = 1 − s); for T > 2 over the last task's share s, the others
   splitting 1 − s evenly, plus the uniform α = 1/T. Each merged net is evaluated on every
   task's test and validation set and their unions.

The record (:class:`masq.protocol.result.Result`) holds the phase curves and accuracy matrix
of the trained θ_t (before merging, as for EWC), plus ``imm``: the sweep and three labelled
points: "val_selected" (α chosen on the union of the validation sets: the honest choice),
"test_best" (α best on the union of the test sets: what papers usually report) and
"uniform". ``metrics`` gets their scalars: ``merged_val.*`` (val-selected α; test accuracy,
plus ``merged_val.val_union``), ``merged.*`` (test-best α), ``merged_uniform.*``, with
``.union``, ``.D1`` ... and ``.alpha`` (the share s of the last task).

Random streams: as :mod:`masq.protocol.run`, plus "d<t>-drop" for the drop-transfer masks of
phase t (seed = sha256("masq:<seed>:d<t>-drop"), the rule of :mod:`masq.protocol.streams`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from masq.config import (
    FIRST_FIELDS,
    IMM_METHODS,
    Consolidation,
    ImportanceKind,
    RunConfig,
    Transfer,
)
from masq.consolidation import imm as merging
from masq.curves import VAL, Curve, task_name, union_name
from masq.errors import ConfigError
from masq.protocol.result import Result, build_result, run_meta
from masq.protocol.run import (
    D1State,
    build_model,
    check_same_d1,
    check_tasks,
    compute_importance,
    cpu_state,
    importance_of,
    make_tasks,
    model_at,
    synchronize,
    train_first,
    train_phase,
)
from masq.protocol.streams import stream_seed
from masq.runtime import resolve_device
from masq.tasks import XY, Task
from masq.training import accuracies, eval_counts

Importance = dict[str, Tensor]
SHARE = "share"  # the sweep's axis: α of the last task
POINTS: tuple[tuple[str, str], ...] = (
    ("val_selected", "merged_val"),
    ("test_best", "merged"),
    ("uniform", "merged_uniform"),
)


def drop_stream(phase: int) -> str:
    """The drop-transfer mask stream of phase ``phase`` (0-based): "d2-drop", ..."""
    return f"d{phase + 1}-drop"


def drop_seed(seed: int, phase: int) -> int:
    """The seed of :func:`drop_stream` (:func:`masq.protocol.streams.stream_seed`)."""
    return stream_seed(seed, drop_stream(phase))


def is_imm(config: RunConfig) -> bool:
    """Whether ``config`` is an IMM run (consolidation mean-imm or mode-imm)."""
    return config.consolidation in IMM_METHODS


def check_imm(config: RunConfig) -> None:
    """ConfigError unless ``config`` is an IMM run (validated)."""
    config.validate()
    if config.consolidation not in IMM_METHODS:
        raise ConfigError(
            f"consolidation {config.consolidation.value!r} is not IMM; use mean-imm or mode-imm "
            "here, or `masq run` for EWC"
        )


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
            return self.net(x)
        params = dict(self.net.named_parameters())
        effective = merging.drop_transfer(params, self.previous, self.p, self.generator)
        return functional_call(self.net, effective, (x,))


class L2TransferGradient:
    """Adds the gradient of L2-transfer, 2 λ (θ − θ_prev), to ``net``'s ``.grad`` when called
    (after the task loss's backward pass; :func:`masq.consolidation.imm.l2_transfer`)."""

    def __init__(self, net: nn.Module, previous: Mapping[str, Tensor], lam: float) -> None:
        self.pairs = [(p, previous[name]) for name, p in net.named_parameters()]
        self.lam = float(lam)

    def __call__(self, model: nn.Module) -> None:
        for p, prev in self.pairs:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p.detach() - prev, alpha=2.0 * self.lam)


@dataclass
class Trained:
    """The solutions θ_1..θ_T of an IMM run (CPU state dicts), the curve and seconds of each
    phase. Runs that differ only in the merge (mean/mode, importance) share one."""

    key: tuple[Any, ...]
    states: list[dict[str, Tensor]]
    curves: list[Curve]
    seconds: list[float]


def training_key(config: RunConfig) -> tuple[Any, ...]:
    """What determines the trained θ_t of an IMM run: the task-1 fields, lr2, iters2 and the
    transfer with the parameters it uses (not the merge, not the importance)."""
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


def train_sequence(
    config: RunConfig, d1: D1State, tasks: list[Task], *, progress: bool = False
) -> Trained:
    """Phases 2..T of an IMM run from the task-1 state ``d1`` (module docstring, step 2)."""
    check_imm(config)
    check_same_d1(config, d1)
    check_tasks(config, tasks)
    device = resolve_device(config.device)
    model = model_at(config, d1.state_dict, tasks).to(device)
    states, curves, seconds = [dict(d1.state_dict)], [d1.curve], [d1.seconds]
    l2 = config.transfer in (Transfer.L2, Transfer.L2_DROP)
    drop = config.transfer in (Transfer.DROP, Transfer.L2_DROP)
    for phase in range(1, len(tasks)):
        previous = {k: v.detach().clone() for k, v in model.named_parameters()}
        penalty = L2TransferGradient(model, previous, config.transfer_lam) if l2 else None
        trained: nn.Module = model
        if drop:
            generator = torch.Generator(device=device).manual_seed(drop_seed(config.seed, phase))
            trained = DropTransferNet(model, previous, config.drop_p, generator)
        curve, s = train_phase(
            config, tasks, trained, phase, penalty=penalty, device=device, progress=progress
        )
        states.append(cpu_state(model))
        curves.append(curve)
        seconds.append(s)
    return Trained(training_key(config), states, curves, seconds)


def merge(
    config: RunConfig,
    states: Sequence[Mapping[str, Tensor]],
    importances: Sequence[Mapping[str, Tensor]],
    alphas: Sequence[float],
) -> dict[str, Tensor]:
    """The merged parameters of ``config``'s method: mean-IMM or mode-IMM."""
    if config.consolidation == Consolidation.MODE_IMM:
        return merging.mode_imm(states, importances, alphas)
    return merging.mean_imm(states, alphas)


def merge_sets(tasks: list[Task]) -> tuple[dict[str, XY], dict[str, tuple[str, ...]]]:
    """The sets every merged net is evaluated on: each task's test ("D1"...) and validation
    ("val:D1"...) set, and the unions of all tasks of both."""
    names = [task_name(j) for j in range(len(tasks))]
    sets: dict[str, XY] = {n: t.test for n, t in zip(names, tasks, strict=True)}
    sets |= {VAL + n: t.val for n, t in zip(names, tasks, strict=True)}
    union = union_name(len(tasks))
    unions = {union: tuple(names), VAL + union: tuple(VAL + n for n in names)}
    return sets, unions


def sweep_shares(config: RunConfig) -> list[float]:
    """The shares s of the last task to evaluate: the grid of ``alpha_step`` and, for T > 2,
    the uniform 1/T (module docstring)."""
    values = merging.shares(config.alpha_step)
    if config.n_tasks > 2:
        values = sorted({*values, 1.0 / config.n_tasks})
    return values


def evaluate_merges(
    config: RunConfig,
    tasks: list[Task],
    states: Sequence[Mapping[str, Tensor]],
    importances: Sequence[Mapping[str, Tensor]],
    shares: Sequence[float],
    *,
    device: torch.device | None = None,
) -> dict[str, list[float]]:
    """The sweep: {"share": shares, set or union name: [accuracy of the merge at each share]}
    (:func:`merge_sets`); evaluation only, nothing is trained."""
    device = resolve_device(config.device) if device is None else device
    on_device = [{k: v.to(device) for k, v in s.items()} for s in states]
    imps = [{k: v.to(device) for k, v in f.items()} for f in importances]
    sets, unions = merge_sets(tasks)
    model = build_model(config, tasks).to(device)
    out: dict[str, list[float]] = {SHARE: [float(s) for s in shares]}
    for s in shares:
        alphas = merging.share_alphas(len(states), s)
        model.load_state_dict(merge(config, on_device, imps, alphas))
        acc = accuracies(eval_counts(model, sets, precision=config.precision), unions)
        for name, value in acc.items():
            out.setdefault(name, []).append(value)
    return out


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value (NaNs ignored; the earliest on ties)."""
    finite = [i for i, v in enumerate(values) if not math.isnan(v)] or list(range(len(values)))
    return max(finite, key=lambda i: (values[i], -i))


def sweep_points(sweep: Mapping[str, Sequence[float]], n_tasks: int) -> dict[str, dict]:
    """The labelled points of a sweep: "val_selected" (max of the validation union),
    "test_best" (max of the test union), "uniform" (share 1/T, or the nearest share)."""
    union = union_name(n_tasks)
    shares = sweep[SHARE]
    uniform = min(range(len(shares)), key=lambda i: abs(shares[i] - 1.0 / n_tasks))
    index = {
        "val_selected": argmax(sweep[VAL + union]),
        "test_best": argmax(sweep[union]),
        "uniform": uniform,
    }
    return {label: {k: v[i] for k, v in sweep.items()} for label, i in index.items()}


def imm_metrics(points: Mapping[str, Mapping[str, float]], n_tasks: int) -> dict[str, float]:
    """The scalars of the labelled points for ``metrics`` (module docstring)."""
    union = union_name(n_tasks)
    out: dict[str, float] = {}
    for label, prefix in POINTS:
        p = points[label]
        out[f"{prefix}.union"] = p[union]
        out |= {f"{prefix}.{task_name(j)}": p[task_name(j)] for j in range(n_tasks)}
        out[f"{prefix}.alpha"] = p[SHARE]
    out["merged_val.val_union"] = points["val_selected"][VAL + union]
    return out


def task_importances(
    config: RunConfig,
    tasks: list[Task],
    trained: Trained,
    first: Mapping[str, Tensor] | None,
    first_seconds: float,
) -> tuple[list[Importance], list[float]]:
    """F_1..F_T of a mode-IMM run at θ_1..θ_T, each on its task's training data (``first``:
    task 1's, when already computed); ([], []) for mean-IMM."""
    if config.consolidation != Consolidation.MODE_IMM:
        return [], []
    if config.importance == ImportanceKind.NONE:
        raise ConfigError("consolidation mode-imm needs an importance; use fisher or masq")
    device = resolve_device(config.device)
    imps: list[Importance] = []
    seconds: list[float] = []
    for t, state in enumerate(trained.states):
        if t == 0 and first:
            imps.append(dict(first))
            seconds.append(float(first_seconds))
            continue
        model = model_at(config, state, tasks).to(device)
        f, s = importance_of(config, model, tasks[t], t, device)
        imps.append(f)
        seconds.append(s)
    return imps, seconds


def continue_imm(
    config: RunConfig,
    d1: D1State,
    importance: Mapping[str, Tensor] | None,
    tasks: list[Task],
    importance_seconds: float = 0.0,
    *,
    trained: Trained | None = None,
    progress: bool = False,
    keep_weights: bool = True,
) -> Result:
    """An IMM run from the task-1 state ``d1`` (module docstring): phases 2..T (or the given
    ``trained`` ones, which must match :func:`training_key`), the importances (mode-IMM;
    ``importance`` is task 1's), the α sweep and the record."""
    check_imm(config)
    check_same_d1(config, d1)
    check_tasks(config, tasks)
    if trained is None:
        trained = train_sequence(config, d1, tasks, progress=progress)
    elif trained.key != training_key(config):
        raise ConfigError("continue_imm: the trained solutions belong to another configuration")
    device = resolve_device(config.device)
    imps, imp_seconds = task_importances(config, tasks, trained, importance, importance_seconds)
    start = time.perf_counter()
    shares = sweep_shares(config)
    sweep = evaluate_merges(config, tasks, trained.states, imps, shares, device=device)
    synchronize(device)
    sweep_seconds = time.perf_counter() - start
    points = sweep_points(sweep, len(tasks))
    result = build_result(
        config,
        trained.curves,
        importance=imps[0] if imps else None,
        train_seconds=trained.seconds,
        importance_seconds=imp_seconds,
        meta=run_meta(device),
        weights=[dict(s) for s in trained.states] if keep_weights else None,
    )
    result.metrics.update(imm_metrics(points, len(tasks)))
    result.timings["merge"] = [sweep_seconds]
    result.imm = {
        "method": config.consolidation.value,
        "eps": merging.DEFAULT_EPS if config.consolidation == Consolidation.MODE_IMM else None,
        "sweep": sweep,
        **points,
    }
    return result


def continue_imm_shared(
    configs: Sequence[RunConfig],
    d1: D1State,
    importances: Sequence[tuple[Mapping[str, Tensor], float]],
    tasks: list[Task],
    *,
    keep_weights: bool = False,
) -> list[Result]:
    """:func:`continue_imm` for several configs of one task-1 state, training each distinct
    :func:`training_key` once (mean-IMM and mode-IMM with any importance share it)."""
    cache: dict[tuple[Any, ...], Trained] = {}
    results = []
    for config, (imp, seconds) in zip(configs, importances, strict=True):
        key = training_key(config)
        if key not in cache:
            cache.clear()  # configs arrive grouped by training; keep one in memory
            cache[key] = train_sequence(config, d1, tasks)
        results.append(
            continue_imm(
                config, d1, imp, tasks, seconds, trained=cache[key], keep_weights=keep_weights
            )
        )
    return results


def run_imm(
    config: RunConfig,
    *,
    progress: bool = False,
    data_dir: str | None = None,
    tasks: list[Task] | None = None,
    keep_weights: bool = True,
) -> Result:
    """The whole IMM protocol for one config: tasks, phase 1, phases 2..T, merge sweep."""
    check_imm(config)
    resolve_device(config.device)
    tasks = make_tasks(config, data_dir=data_dir) if tasks is None else tasks
    d1 = train_first(config, tasks, progress=progress)
    importance, seconds = ({}, 0.0)
    if config.consolidation == Consolidation.MODE_IMM:
        importance, seconds = compute_importance(config, d1, tasks)
    return continue_imm(
        config, d1, importance, tasks, seconds, progress=progress, keep_weights=keep_weights
    )


__all__ = [
    "DropTransferNet",
    "L2TransferGradient",
    "Trained",
    "check_imm",
    "continue_imm",
    "continue_imm_shared",
    "drop_seed",
    "drop_stream",
    "evaluate_merges",
    "imm_metrics",
    "is_imm",
    "merge",
    "merge_sets",
    "run_imm",
    "sweep_points",
    "sweep_shares",
    "task_importances",
    "train_sequence",
    "training_key",
]
