"""The continual-learning protocol for T tasks (PAPER.md section 3, for any T >= 2).

A run trains task 1 at lr1 for iters1 (no penalty), then every later task t at lr2 for
iters2 with the consolidation of the tasks before it:

    ewc:         L_t(θ) = CE_t(θ) + Σ_{s<t} (λ/2) Σ_k F^s_k (θ_k − θ^s_k)²
    online-ewc:  L_t(θ) = CE_t(θ) + (λ/2) Σ_k F̃_k (θ_k − θ^{t−1}_k)²,  F̃ <- γ F̃ + F^{t−1}

where θ^s is the state at the end of phase s and F^s its importance (FIM or MaSQ, on task
s's own training data, computed then). With T = 2 both are the paper's protocol.

Stages, so a grid can share work:

    tasks  = make_tasks(config)                        # the SLT's T tasks
    d1     = train_first(config, tasks)                # phase 1 (task 1, λ = 0)
    imp, s = compute_importance(config, d1, tasks)     # task 1's importance at d1
    result = continue_run(config, d1, imp, tasks, s)   # phases 2..T
    run(config) does all four.

Evaluation in every phase: every task's test set ("D1".."DT"; with eval_val also their
validation sets, "val:D1"...), the union of all tasks and, in phase t (1 < t < T), the union
of the tasks seen so far. Random streams: :mod:`masq.protocol.streams`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from masq import importance as masq_importance
from masq import tasks as masq_tasks
from masq.config import (
    FIRST_FIELDS,
    IMM_METHODS,
    Consolidation,
    ImportanceKind,
    RunConfig,
    method_label,
)
from masq.consolidation import ewc
from masq.consolidation.gradient import PenaltyGradient
from masq.curves import VAL, Curve, task_name, union_name
from masq.errors import ConfigError
from masq.models import mlp
from masq.protocol.result import Result, build_result, finite_state, run_meta
from masq.protocol.streams import batches_stream, labels_stream, stream_seed
from masq.runtime import resolve_device
from masq.tasks import XY, Task
from masq.training import TrainConfig, train_task

Importance = dict[str, Tensor]


@dataclass
class D1State:
    """The state after phase 1 (training on task 1): what every run of a grid group starts
    from. ``state_dict`` lives on the CPU (cloned), whatever device trained it."""

    config: RunConfig
    state_dict: dict[str, Tensor]
    curve: Curve
    seconds: float


def make_tasks(config: RunConfig, *, data_dir: str | None = None) -> list[Task]:
    """The SLT's tasks from ``config.dataset`` (permutations seeded by the "tasks" stream)."""
    return masq_tasks.make(
        config.slt,
        dataset=config.dataset,
        seed=stream_seed(config.seed, "tasks"),
        data_dir=data_dir,
    )


def eval_sets(
    config: RunConfig, tasks: list[Task], phase: int
) -> tuple[dict[str, XY], dict[str, tuple[str, ...]]]:
    """The evaluation sets of phase ``phase`` (0-based; module docstring) and the unions
    computed from their counts: {name: (x, y)}, {union name: member names}."""
    n = len(tasks)
    names = [task_name(j) for j in range(n)]
    sets: dict[str, XY] = {name: t.test for name, t in zip(names, tasks, strict=True)}
    groups = [""]
    if config.eval_val:
        sets |= {VAL + name: t.val for name, t in zip(names, tasks, strict=True)}
        groups.append(VAL)
    unions: dict[str, tuple[str, ...]] = {}
    for prefix in groups:
        if 0 < phase < n - 1:  # the tasks seen so far (phase + 1 of them)
            unions[prefix + union_name(phase + 1)] = tuple(prefix + m for m in names[: phase + 1])
        unions[prefix + union_name(n)] = tuple(prefix + m for m in names)
    return sets, unions


def build_model(config: RunConfig, tasks: list[Task]) -> nn.Sequential:
    """The freshly initialized network of ``config`` (seeded by the "init" stream)."""
    in_features = int(tasks[0].train[0].shape[1])
    classes = max(max(t.classes) for t in tasks) + 1
    return mlp(
        config.hidden,
        in_features=in_features,
        classes=classes,
        init=config.init,
        seed=stream_seed(config.seed, "init"),
    )


def check_tasks(config: RunConfig, tasks: list[Task]) -> None:
    """ConfigError unless ``tasks`` has the SLT's number of tasks."""
    if len(tasks) != config.n_tasks:
        raise ConfigError(
            f"slt {config.slt!r} has {config.n_tasks} tasks but {len(tasks)} were given"
        )


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (so timings are true); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_phase(
    config: RunConfig,
    tasks: list[Task],
    model: nn.Module,
    phase: int,
    *,
    penalty: Callable[[nn.Module], None] | None,
    device: torch.device,
    progress: bool = False,
) -> tuple[Curve, float]:
    """Train ``model`` on ``tasks[phase]`` (phase 0 at lr1 for iters1, later ones at lr2 for
    iters2; mini-batches from the phase's stream), evaluating on :func:`eval_sets` at the
    config's schedule and precision; ``penalty`` adds a penalty's gradient after each
    backward pass (``train_task``'s ``penalty_grad``). Returns (curve, seconds)."""
    lr, iters = (config.lr1, config.iters1) if phase == 0 else (config.lr2, config.iters2)
    sets, unions = eval_sets(config, tasks, phase)
    train_config = TrainConfig(
        lr=lr,
        iters=iters,
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        seed=stream_seed(config.seed, batches_stream(phase)),
        eval_schedule=config.eval_schedule,
        precision=config.precision,
    )
    desc = f"train {task_name(phase)}" + ("" if phase == 0 else f" ({method_label(config)})")
    start = time.perf_counter()
    curve = train_task(
        model,
        tasks[phase].train,
        train_config,
        penalty_grad=penalty,
        eval_sets=sets,
        unions=unions,
        device=device,
        progress=progress,
        desc=desc,
    )
    synchronize(device)
    return curve, time.perf_counter() - start


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model``'s state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_first(config: RunConfig, tasks: list[Task], *, progress: bool = False) -> D1State:
    """Phase 1: train a fresh network on task 1 (no penalty) at lr1 for iters1 iterations."""
    config.validate()
    check_tasks(config, tasks)
    device = resolve_device(config.device)
    model = build_model(config, tasks)
    curve, seconds = train_phase(config, tasks, model, 0, penalty=None, device=device,
                                 progress=progress)  # fmt: skip
    return D1State(config=config, state_dict=cpu_state(model), curve=curve, seconds=seconds)


def check_same_d1(config: RunConfig, d1: D1State) -> None:
    """ConfigError unless ``config`` agrees with ``d1``'s config on every field that
    determines phase 1 (:data:`masq.config.FIRST_FIELDS`)."""
    differ = [f for f in FIRST_FIELDS if getattr(config, f) != getattr(d1.config, f)]
    if differ:
        raise ConfigError(
            f"this config differs from the task-1 state in {differ}; train task 1 with it"
        )


def importance_of(
    config: RunConfig, model: nn.Module, task: Task, task_index: int, device: torch.device
) -> tuple[Importance, float]:
    """(importance, seconds) of ``model`` on ``task``'s training data; {} for "none".

    One pass over the training set in order, in batches of ``masq_batch``: MaSQ averages the
    squared batch-mean gradients (``scale``), the FIM is exact per sample whatever the batch
    size (labels from ``fisher_labels``; "sampled" draws from the task's labels stream).
    The importance functions evaluate in eval mode and leave the model as it was.
    """
    if config.importance == ImportanceKind.NONE:
        return {}, 0.0
    x, y = task.train
    batches = masq_importance.batches(x, y, config.masq_batch)
    start = time.perf_counter()
    if config.importance == ImportanceKind.FISHER:
        generator = torch.Generator(device=device).manual_seed(
            stream_seed(config.seed, labels_stream(task_index))
        )
        imp = masq_importance.fisher(
            model, batches, labels=config.fisher_labels, generator=generator, device=device
        )
    else:
        imp = masq_importance.masq(model, batches, scale=config.scale, device=device)
    synchronize(device)
    return imp, time.perf_counter() - start


def model_at(config: RunConfig, state_dict: Mapping[str, Tensor], tasks: list[Task]) -> nn.Module:
    """A network of ``config``'s architecture holding ``state_dict``."""
    model = build_model(config, tasks)
    model.load_state_dict(dict(state_dict))
    return model


def compute_importance(
    config: RunConfig, d1: D1State, tasks: list[Task]
) -> tuple[Importance, float]:
    """(importance, seconds) of task 1 at the state ``d1`` ({} for "none")."""
    config.validate()
    check_same_d1(config, d1)
    if config.importance == ImportanceKind.NONE:
        return {}, 0.0
    device = resolve_device(config.device)
    model = model_at(config, d1.state_dict, tasks).to(device)
    return importance_of(config, model, tasks[0], 0, device)


def continue_run(
    config: RunConfig,
    d1: D1State,
    importance: Mapping[str, Tensor],
    tasks: list[Task],
    importance_seconds: float = 0.0,
    *,
    progress: bool = False,
    keep_weights: bool = True,
) -> Result:
    """Phases 2..T from the state ``d1`` with task 1's ``importance`` (module docstring).

    With ``importance="none"`` or λ = 0 no penalty is added and no later importance is
    computed. ``keep_weights`` keeps the state at the end of every phase in the result.
    """
    config.validate()
    if config.consolidation in IMM_METHODS:
        raise ConfigError(
            f"consolidation {config.consolidation}: IMM runs merge after training; use "
            "masq.protocol.imm.continue_imm (or protocol.run, which routes there)"
        )
    check_same_d1(config, d1)
    check_tasks(config, tasks)
    device = resolve_device(config.device)
    model = model_at(config, d1.state_dict, tasks).to(device)
    consolidate = config.importance != ImportanceKind.NONE
    anchors: list[ewc.Anchor] = []
    running: dict[str, Tensor] | None = None
    diverged = None if finite_state(d1.state_dict) else "phase 1"
    curves, train_s, imp_s = [d1.curve], [d1.seconds], [float(importance_seconds)]
    weights = [dict(d1.state_dict)] if keep_weights else None
    current: Mapping[str, Tensor] = importance
    for phase in range(1, len(tasks)):
        penalty = None
        if consolidate and diverged is None:  # anchor the state before this phase (a diverged
            # state has no importance to anchor: the run is recorded as diverged instead)
            if config.consolidation == Consolidation.ONLINE_EWC:
                running = ewc.online_importance(running, current, config.gamma)
                anchors = [ewc.anchor(model, running)]
            else:
                anchors = [*anchors, ewc.anchor(model, current)]
            if config.lam > 0:
                penalty = PenaltyGradient(model, anchors, config.lam)
        curve, seconds = train_phase(
            config, tasks, model, phase, penalty=penalty, device=device, progress=progress
        )
        curves.append(curve)
        train_s.append(seconds)
        if diverged is None and not finite_state(dict(model.named_parameters())):
            diverged = f"phase {phase + 1}"
        if weights is not None:
            weights.append(cpu_state(model))
        if consolidate and diverged is None and config.lam > 0 and phase < len(tasks) - 1:
            current, seconds = importance_of(config, model, tasks[phase], phase, device)
            imp_s.append(seconds)
    return build_result(
        config,
        curves,
        importance=importance,
        train_seconds=train_s,
        importance_seconds=imp_s,
        meta=run_meta(device),
        weights=weights,
        diverged=diverged,
    )


def run(
    config: RunConfig,
    *,
    progress: bool = False,
    data_dir: str | None = None,
    tasks: list[Task] | None = None,
    keep_weights: bool = True,
) -> Result:
    """The whole protocol for one config: tasks, phase 1, task 1's importance, phases 2..T
    (IMM configs go to :func:`masq.protocol.imm.run_imm`: train on, then merge)."""
    config.validate()
    if config.consolidation in IMM_METHODS:
        from masq.protocol.imm import run_imm

        return run_imm(
            config, progress=progress, data_dir=data_dir, tasks=tasks, keep_weights=keep_weights
        )
    resolve_device(config.device)
    tasks = make_tasks(config, data_dir=data_dir) if tasks is None else tasks
    d1 = train_first(config, tasks, progress=progress)
    importance, seconds = compute_importance(config, d1, tasks)
    return continue_run(
        config, d1, importance, tasks, seconds, progress=progress, keep_weights=keep_weights
    )
