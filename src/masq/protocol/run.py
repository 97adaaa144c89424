"""The continual-learning protocol for T tasks (the paper's, for any T >= 2): one
phase loop for every consolidation method and importance measure.

Phase 1 trains a fresh network on task 1 at lr1 for iters1 (no penalty): the state a grid's
runs share. Every later phase t trains on task t at lr2 for iters2; the method
(:mod:`masq.consolidation`, looked up by ``config.consolidation``) and the measure
(:mod:`masq.importance`, ``config.importance``) are asked, never known:

    state = method.after_phase(method.init(), model, F_1, 0)       F_1 = measure(θ_1, task 1)
    for t = 2..T:
        plan  = method.before_phase(state, model, t)               # penalty (+ wrapper)
        train task t with plan.penalty's gradient                  # measure's per-step hook
        F_t   = measure(θ_t, task t)   where method.wants_importance(t)
        state = method.after_phase(state, model, F_t, t)
    method.end(state)                                              # IMM's merge sweep

With EWC, L_t(θ) = CE_t(θ) + Σ_{s<t} (λ/2) Σ_k F^s_k (θ_k − θ^s_k)²; with online EWC one
running F̃ <- γ F̃ + F^{t−1} and the latest anchor; with IMM weight transfer (optionally L2-
and drop-transfer) and a merge after the last phase. With T = 2 EWC is the paper's protocol.

Stages, so a grid can share work:

    tasks  = make_tasks(config)                        # the SLT's T tasks in its scenario
    d1     = train_first(config, tasks)                # phase 1 (task 1, no penalty)
    imp, s = compute_importance(config, d1, tasks)     # task 1's importance at d1
    result = continue_run(config, d1, imp, tasks, s)   # phases 2..T (+ the method's end)

:mod:`masq.protocol.phases` holds the loop (``continue_run``, ``continue_runs`` for configs
whose phases train alike, :meth:`~masq.consolidation.Method.shared_training`) and ``run``,
which does all four.

Evaluation in every phase: every task's test set ("D1".."DT"; with eval_val also their
validation sets, "val:D1"...), the union of all tasks and, in phase t (1 < t < T), the union
of the tasks seen so far; in the task-incremental scenario each set's argmax runs over its
task's output units. Random streams: :mod:`masq.streams`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from masq import tasks as masq_tasks
from masq.config import FIRST_FIELDS, AdamState, ClassOrder, ClassUnits, RunConfig
from masq.consolidation import PhasePlan, check_config, get_method, method_label
from masq.curves import VAL, Curve, task_name, union_name
from masq.errors import ConfigError
from masq.importance import Importance, MeasureContext, StepTracker, get_measure
from masq.models import mlp
from masq.runtime import resolve_device
from masq.scenarios import apply_scenario, n_outputs, seen_units
from masq.streams import batches_stream, labels_stream, stream_seed
from masq.tasks import XY, Task
from masq.training import (
    AdamMoments,
    TrainConfig,
    accuracies,
    adam_moments,
    eval_counts,
    load_adam_moments,
    make_adam,
    train_task,
)


@dataclass
class D1State:
    """The state after phase 1 (training on task 1): what every run of a grid group starts
    from. ``state_dict`` lives on the CPU (cloned), whatever device trained it. ``tracked``
    holds task 1's importance where the measure accumulates it during training; ``adam`` Adam's
    moments and step count after it where the run keeps them (``adam_state`` keep)."""

    config: RunConfig
    state_dict: dict[str, Tensor]
    curve: Curve
    seconds: float
    tracked: Importance | None = None
    adam: AdamMoments | None = None  # Adam's state after phase 1 (``adam_state`` keep)


def make_tasks(config: RunConfig, *, data_dir: str | None = None) -> list[Task]:
    """The SLT's tasks from ``config.dataset`` (images padded by ``config.pad`` zero pixels per
    side; permutations seeded by the "tasks" stream, task 1's with ``permute_first`` by the
    "task1-permutation" stream; with ``class_order`` seeded, a class split's classes permuted by
    the "class-order" stream; with ``train_on_val`` the validation images trained on too),
    relabelled for ``config.scenario`` (:func:`masq.scenarios.apply_scenario`)."""
    seeded = config.class_order == ClassOrder.SEEDED
    tasks = masq_tasks.make(
        config.slt,
        dataset=config.dataset,
        seed=stream_seed(config.seed, "tasks"),
        data_dir=data_dir,
        class_seed=stream_seed(config.seed, "class-order") if seeded else None,
        pad=config.pad,
        first_seed=stream_seed(config.seed, "task1-permutation") if config.permute_first else None,
        train_on_val=config.train_on_val,
    )
    return apply_scenario(tasks, config.scenario)


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


def phase_tasks(config: RunConfig, tasks: Sequence[Task], phase: int) -> list[Task]:
    """The tasks as phase ``phase`` (0-based) trains, passes and evaluates them: as they are,
    or, with ``class_units`` seen, every task's units the labels of tasks 1..phase+1
    (:func:`masq.scenarios.seen_units`)."""
    if config.class_units == ClassUnits.SEEN:
        return seen_units(tasks, phase)
    return list(tasks)


def eval_units(tasks: Sequence[Task]) -> dict[str, tuple[int, ...]]:
    """{set name: the task's output units} for the tasks that have them (task-incremental
    scenario: evaluation of "D2" and "val:D2" argmaxes over task 2's units only)."""
    out: dict[str, tuple[int, ...]] = {}
    for j, task in enumerate(tasks):
        if task.units is not None:
            out[task_name(j)] = out[VAL + task_name(j)] = tuple(task.units)
    return out


def build_model(config: RunConfig, tasks: list[Task]) -> nn.Sequential:
    """The freshly initialized network of ``config`` (seeded by the "init" stream), its head
    sized for the scenario's tasks (:func:`masq.scenarios.n_outputs`)."""
    return mlp(
        config.hidden,
        in_features=int(tasks[0].train[0].shape[1]),
        classes=n_outputs(tasks),
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


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model``'s state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def model_at(config: RunConfig, state_dict: Mapping[str, Tensor], tasks: list[Task]) -> nn.Module:
    """A network of ``config``'s architecture holding ``state_dict``."""
    model = build_model(config, tasks)
    model.load_state_dict(dict(state_dict))
    return model


def measure_context(
    config: RunConfig, task: Task, task_index: int, device: torch.device
) -> MeasureContext:
    """What ``config``'s measure gets for task ``task_index``'s pass: its settings, the pass's
    batch size, a generator seeded by the task's "fisher-labels" stream, the task's units."""
    generator = torch.Generator(device=device).manual_seed(
        stream_seed(config.seed, labels_stream(task_index))
    )
    measure = get_measure(config.importance)
    units = None if task.units is None else tuple(task.units)
    return MeasureContext(measure.settings(config), config.masq_batch, generator, device, units)


def make_tracker(
    config: RunConfig, model: nn.Module, task: Task, task_index: int, device: torch.device
) -> StepTracker | None:
    """The per-step tracker of a measure accumulated during training (None for the others)."""
    measure = get_measure(config.importance)
    if measure.tracker is None:
        return None
    return measure.tracker(model, measure_context(config, task, task_index, device))


def phase_units(
    tasks: Sequence[Task], phase: int, plan: PhasePlan
) -> tuple[tuple[int, ...] | None, Tensor | None, tuple[tuple[int, ...], ...] | None]:
    """(units, sample_units, unit_sets) of ``train_task`` for phase ``phase``: the task's own
    units (task-incremental; None otherwise) or, when the plan brings its own data in the
    task-incremental scenario, each sample's task (``plan.train_tasks``) and every task's
    units."""
    units = tasks[phase].units
    if plan.train is None or units is None:
        return units, None, None
    if plan.train_tasks is None:
        raise ConfigError(
            "phase plan: training data in the task-incremental scenario needs train_tasks "
            "(each sample's task); give it"
        )
    sets = tuple(tuple(t.units) if t.units is not None else () for t in tasks)
    return None, plan.train_tasks, sets


def train_phase(
    config: RunConfig,
    tasks: list[Task],
    model: nn.Module,
    phase: int,
    *,
    plan: PhasePlan | None = None,
    tracker: StepTracker | None = None,
    device: torch.device,
    progress: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[Curve, float]:
    """Train ``model`` on ``tasks[phase]`` (phase 0 at lr1 for iters1, later ones at lr2 for
    iters2; mini-batches from the phase's stream), evaluating on :func:`eval_sets` at the
    config's schedule and precision. ``plan`` (the method's): its penalty's gradient is added
    after each backward pass, its wrapper is what training (not evaluation) runs, its
    ``train`` data (if any) replaces the task's (:func:`phase_units`); ``tracker`` is called
    after each optimizer step, and its ``observe_grad`` (if it has one) after the task loss's
    backward pass, before the penalty's gradient. ``optimizer``: the one to step (``adam_state``
    keep: :func:`phase_optimizer`), default a fresh Adam. Returns (curve, seconds)."""
    lr, iters = (config.lr1, config.iters1) if phase == 0 else (config.lr2, config.iters2)
    tasks = phase_tasks(config, tasks, phase)
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
    plan = plan or PhasePlan()
    trained = plan.wrap(model) if plan.wrap is not None else model
    if optimizer is not None and trained is not model:
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for p in trained.parameters()):
            raise ConfigError(
                f"--adam-state keep: {config.consolidation} trains parameters of its own in "
                f"phase {phase + 1}, which one Adam over the network cannot carry; use "
                "--adam-state reset"
            )
    penalty = plan.penalty

    def penalty_grad(net: nn.Module) -> None:  # at the network's own parameters, not a wrapper's
        assert penalty is not None
        penalty.add_grad(dict((model if net is trained else net).named_parameters()))

    desc = f"train {task_name(phase)}" + ("" if phase == 0 else f" ({method_label(config)})")
    start = time.perf_counter()
    units, sample_units, unit_sets = phase_units(tasks, phase, plan)
    curve = train_task(
        trained,
        tasks[phase].train if plan.train is None else plan.train,
        train_config,
        eval_sets=sets,
        unions=unions,
        device=device,
        progress=progress,
        desc=desc,
        penalty_grad=None if penalty is None else penalty_grad,
        step_hook=None if tracker is None else tracker.step,
        grad_hook=getattr(tracker, "observe_grad", None),
        units=units,
        sample_units=sample_units,
        unit_sets=unit_sets,
        eval_units=eval_units(tasks) or None,
        optimizer=optimizer,
    )
    synchronize(device)
    return curve, time.perf_counter() - start


def train_first(config: RunConfig, tasks: list[Task], *, progress: bool = False) -> D1State:
    """Phase 1: train a fresh network on task 1 (no penalty) at lr1 for iters1 iterations
    (with the measure's tracker where it accumulates during training)."""
    check_config(config)
    check_tasks(config, tasks)
    device = resolve_device(config.device)
    model = build_model(config, tasks).to(device)
    tracker = make_tracker(config, model, phase_tasks(config, tasks, 0)[0], 0, device)
    optimizer = phase_optimizer(config, model, None)
    curve, seconds = train_phase(
        config,
        tasks,
        model,
        0,
        tracker=tracker,
        device=device,
        progress=progress,
        optimizer=optimizer,
    )
    tracked = None if tracker is None else tracker.importance()
    adam = None if optimizer is None else adam_moments(optimizer, model)
    return D1State(config, cpu_state(model), curve, seconds, tracked, adam)


def carried_adam(config: RunConfig, d1: D1State) -> AdamMoments | None:
    """Adam's state after phase 1 that ``config``'s later phases continue from (``adam_state``
    keep), None for ``adam_state`` reset; a one-line ConfigError where keep meets a task-1
    state trained without it."""
    if config.adam_state != AdamState.KEEP:
        return None
    if d1.adam is None:
        raise ConfigError(
            "--adam-state keep: the task-1 state holds no Adam state; train task 1 with "
            "--adam-state keep (masq.protocol.train_first)"
        )
    return d1.adam


def phase_optimizer(
    config: RunConfig, model: nn.Module, moments: AdamMoments | None
) -> torch.optim.Optimizer | None:
    """The Adam a run with ``adam_state`` keep steps through all its phases: over ``model``'s
    parameters, with ``moments`` (the state after phase 1) loaded when given; None (a fresh
    Adam per phase, made by :func:`masq.training.train_task`) for ``adam_state`` reset."""
    if config.adam_state != AdamState.KEEP:
        return None
    optimizer = make_adam(model.parameters(), config.lr1)
    if moments is not None:
        load_adam_moments(optimizer, model, moments)
    return optimizer


def check_same_d1(config: RunConfig, d1: D1State) -> None:
    """ConfigError unless ``config`` agrees with ``d1``'s config on every field that
    determines phase 1 (:data:`masq.config.FIRST_FIELDS`)."""
    differ = [f for f in FIRST_FIELDS if getattr(config, f) != getattr(d1.config, f)]
    if differ:
        raise ConfigError(
            f"this config differs from the task-1 state in {differ}; train task 1 with it"
        )


def importance_of(
    config: RunConfig,
    model: nn.Module,
    task: Task,
    task_index: int,
    device: torch.device,
    tracker: StepTracker | None = None,
) -> tuple[Importance, float]:
    """(importance, seconds) of ``model`` on ``task`` by ``config``'s measure: a pass over
    the task's training data in order (:class:`~masq.importance.MeasureContext`: batches of
    ``masq_batch``, the task's labels stream), the ``tracker``'s accumulation for a measure
    tracked during training, {} for a measure without importance. The model is left as it
    was."""
    measure = get_measure(config.importance)
    start = time.perf_counter()
    if tracker is not None:
        imp = tracker.importance()
    elif measure.compute is not None:
        imp = measure.compute(model, task.train, measure_context(config, task, task_index, device))
    else:
        return {}, 0.0
    synchronize(device)
    return imp, time.perf_counter() - start


def compute_importance(
    config: RunConfig, d1: D1State, tasks: list[Task]
) -> tuple[Importance, float]:
    """(importance, seconds) of task 1 at the state ``d1`` ({} where the method takes none)."""
    check_config(config)
    check_same_d1(config, d1)
    measure = get_measure(config.importance)
    if not get_method(config.consolidation).wants_importance(config, 0):
        return {}, 0.0
    if measure.tracker is not None:
        if d1.tracked is None or d1.config.importance != config.importance:
            raise ConfigError(
                f"importance {measure.name!r} accumulates during training: train task 1 "
                "with it (masq.protocol.train_first)"
            )
        if measure.settings(d1.config) != measure.settings(config):
            raise ConfigError(
                f"importance {measure.name!r} was tracked during task 1 with "
                f"{measure.settings(d1.config)}, this run has {measure.settings(config)}; "
                "train task 1 with this run's settings"
            )
        return dict(d1.tracked), 0.0
    if measure.compute is None:
        return {}, 0.0
    device = resolve_device(config.device)
    model = model_at(config, d1.state_dict, tasks).to(device)
    return importance_of(config, model, phase_tasks(config, tasks, 0)[0], 0, device)


def merged_accuracies(
    config: RunConfig, tasks: list[Task], model: nn.Module, params: Mapping[str, Tensor]
) -> dict[str, float]:
    """Accuracies of ``model`` holding ``params`` on every task's test and validation set
    ("D1"..., "val:D1"...) and the unions of all tasks of both (what a merge is judged on)."""
    names = [task_name(j) for j in range(len(tasks))]
    sets: dict[str, XY] = {n: t.test for n, t in zip(names, tasks, strict=True)}
    sets |= {VAL + n: t.val for n, t in zip(names, tasks, strict=True)}
    union = union_name(len(tasks))
    unions = {union: tuple(names), VAL + union: tuple(VAL + n for n in names)}
    model.load_state_dict(dict(params))
    units = eval_units(tasks) or None
    return accuracies(eval_counts(model, sets, precision=config.precision, units=units), unions)


__all__ = [
    "D1State",
    "build_model",
    "check_same_d1",
    "check_tasks",
    "compute_importance",
    "cpu_state",
    "eval_sets",
    "eval_units",
    "importance_of",
    "make_tasks",
    "make_tracker",
    "measure_context",
    "merged_accuracies",
    "model_at",
    "phase_tasks",
    "phase_units",
    "synchronize",
    "train_first",
    "train_phase",
]
