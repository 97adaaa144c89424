"""Phases 2..T of K runs that share task 1's state, trained at once (:mod:`masq.stacked`).

The K runs of a grid group go through the same phase loop as K
:func:`~masq.protocol.run.continue_run` calls, with each phase's training stacked:

    state_k = method.after_phase(method.init(), θ_1, F_1, 0)            per run, as one by one
    for t = 2..T:
        plan_k = method.before_phase(state_k, θ_k, t)    a diagonal quadratic penalty (or none)
        (λ_k, θ̄_k, F̄_k) = plan_k.penalty.merged()      Σ_a F^a (θ − θ^a) = F̄ (θ − θ̄)
        train the K runs on task t at once (the same "d<t>-batches" stream, evaluation sets
        and points as one by one), run k with λ_k F̄_k (θ_k − θ̄_k) added to its gradient
        F_t,k = measure(θ_k, task t)   where method.wants_importance(t)    per run, unstacked
        state_k = method.after_phase(state_k, θ_k, F_t,k, t)

EWC's anchors (one per earlier task) collapse into one per run (the identity of
:func:`~masq.consolidation.penalty.merged_anchor`), online EWC has one already. Records are
those of the one-by-one loop (:func:`~masq.protocol.phases.finish_record`) with
``timings["train"][t]`` the stack's time of phase t / K, ``meta["stack"]`` = K and
``meta["stack_seconds"]`` the stacked phases' total. With two tasks it is the paper's protocol,
number for number what the stacked engine of two-task runs always gave.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from masq.config import RunConfig
from masq.consolidation import PhasePlan, QuadraticPenalty, check_config, get_method, method_label
from masq.errors import ConfigError
from masq.fileio import warn
from masq.importance import get_measure
from masq.protocol.phases import Context, finish_record
from masq.protocol.result import Result, finite_state, run_meta, state_fingerprint
from masq.protocol.resume import PhaseCheckpoint
from masq.protocol.run import (
    D1State,
    carried_adam,
    check_same_d1,
    check_tasks,
    eval_sets,
    eval_units,
    importance_of,
    model_at,
    phase_tasks,
    synchronize,
)
from masq.runtime import resolve_device
from masq.stacked import train_stacked
from masq.stacked.adam import compiled_step_active
from masq.streams import batches_stream, stream_seed
from masq.tasks import Task
from masq.training import AdamMoments, heartbeat


def stackable(config: RunConfig) -> str | None:
    """Why ``config`` cannot be stacked, or None when it can: the stacked engine trains the
    later phases of runs of the MLP with a diagonal quadratic penalty, so it takes the methods
    that declare ``stackable`` (EWC, online EWC) with any diagonal measure computed after a
    phase (a structured one, K-FAC, and one accumulated during training, SI, go one by one)."""
    method = get_method(config.consolidation)
    if not method.stackable:
        return f"consolidation {method.name!r} is not stacked (its phases are not plain EWC)"
    measure = get_measure(config.importance)
    if measure.kind != "diagonal":
        return (
            f"importance {config.importance!r} is structured ({measure.kind}); the stacked "
            "engine's penalty is diagonal"
        )
    if measure.tracker is not None and config.n_tasks > 2:
        return (
            f"importance {config.importance!r} accumulates during training (a per-step hook "
            "per run, which the stacked engine does not run)"
        )
    return None


def _check_stack(configs: Sequence[RunConfig], d1: D1State, tasks: list[Task]) -> None:
    """ConfigError unless every config can be stacked with the first from ``d1``."""
    first = configs[0]
    for c in configs:
        check_same_d1(c, d1)
        check_tasks(c, tasks)
        reason = stackable(c)
        if reason is not None:
            raise ConfigError(f"stacked: {reason}; continue this run with continue_run")
        if (c.iters2, c.device, c.eval_schedule, c.precision) != (
            first.iters2,
            first.device,
            first.eval_schedule,
            first.precision,
        ):
            raise ConfigError(
                "stacked: the runs of one stack need the same iters2, device, evaluation "
                "schedule and precision"
            )


def diagonal_penalty(
    plan: PhasePlan, config: RunConfig
) -> tuple[float, dict[str, Tensor], dict[str, Tensor]] | None:
    """(λ, θ̄, F̄) of a phase plan's penalty (:meth:`QuadraticPenalty.merged`), None without
    one; a plan the stacked engine cannot train (a wrapper, its own data, another penalty) is a
    one-line ConfigError."""
    if plan.wrap is not None or plan.train is not None:
        raise ConfigError(
            f"stacked: consolidation {config.consolidation!r} wraps the network or brings its "
            "own data in a phase; declare it not stackable"
        )
    if plan.penalty is None:
        return None
    if not isinstance(plan.penalty, QuadraticPenalty):
        raise ConfigError(
            f"stacked: the penalty of {config.consolidation!r} is a "
            f"{type(plan.penalty).__name__}, not a diagonal QuadraticPenalty; run it one by one"
        )
    return plan.penalty.merged()


def continue_stacked(
    configs: Sequence[RunConfig],
    d1: D1State,
    importances: Sequence[Mapping[str, Tensor]],
    tasks: list[Task],
    importance_seconds: Sequence[float] | None = None,
    *,
    keep_weights: bool = False,
    checkpoint: PhaseCheckpoint | None = None,
) -> list[Result]:
    """:func:`~masq.protocol.phases.continue_run` for K configs sharing ``d1`` (module
    docstring), each with its task-1 importance (and the seconds it took). ``checkpoint``:
    the loop's state is saved there between phases, and a state found there is resumed
    (:mod:`masq.protocol.resume`)."""
    configs = [check_config(c) for c in configs]
    if not configs:
        return []
    _check_stack(configs, d1, tasks)
    first = configs[0]
    k = len(configs)
    seconds_first = list(importance_seconds or [0.0] * k)
    device = resolve_device(first.device)
    model = model_at(first, d1.state_dict, tasks).to(device)  # the between-phase network
    ctx = Context(first, tasks, device)
    start_finite = finite_state(d1.state_dict)  # else diverged in phase 1, reported there
    diverged: list[str | None] = [None if start_finite else "phase 1"] * k
    methods = [get_method(c.consolidation) for c in configs]
    firsts: list[dict[str, Tensor] | None] = []
    states: list[Any] = []
    imp_seconds: list[list[float]] = []
    for c, method, given, s in zip(configs, methods, importances, seconds_first, strict=True):
        wants = method.wants_importance(c, 0)
        own = dict(given) if wants and get_measure(c.importance).gives_importance else None
        if own is not None and set(own) != set(d1.state_dict):
            raise ConfigError(
                f"stacked: importance keys {sorted(own)} do not match the model's "
                f"{sorted(d1.state_dict)}; compute the importance on this task-1 state"
            )
        firsts.append(own)
        states.append(
            method.after_phase(c, method.init(c), model, own if start_finite else None, 0)
        )
        imp_seconds.append([float(s)] if wants else [])
    current: list[dict[str, Tensor]] = [dict(d1.state_dict)] * k
    curves: list[list[Any]] = [[d1.curve] for _ in configs]
    train_s: list[list[float]] = [[d1.seconds] for _ in configs]
    weights = [[dict(d1.state_dict)] for _ in configs] if keep_weights else None
    carried = carried_adam(first, d1)
    adam = None if carried is None else [carried] * k  # adam_state keep: each run's Adam state
    stack_seconds = 0.0
    start = 1
    loaded = None if checkpoint is None else checkpoint.load(device)
    if loaded is not None:
        done, saved = loaded
        current, curves, train_s, weights = (
            saved["current"],
            saved["curves"],
            saved["train_s"],
            saved["weights"],
        )
        diverged, states, imp_seconds = saved["diverged"], saved["states"], saved["imp_seconds"]
        adam, stack_seconds, start = saved["adam"], saved["stack_seconds"], done + 1
        heartbeat.restored(done * first.iters2)  # the steps of the phases done before
    for phase in range(start, len(tasks)):
        penalties = []
        for run, (c, method) in enumerate(zip(configs, methods, strict=True)):
            model.load_state_dict(current[run])
            plan = method.before_phase(c, states[run], model, phase, ctx)
            penalties.append(None if diverged[run] else diagonal_penalty(plan, c))
        phase_curves, finals, seconds = _train_phase(
            configs, tasks, phase, current, penalties, adam
        )
        stack_seconds += seconds
        for run, (c, method) in enumerate(zip(configs, methods, strict=True)):
            curves[run].append(phase_curves[run])
            train_s[run].append(seconds / k)
            current[run] = finals[run]
            if weights is not None:
                weights[run].append(finals[run])
            if diverged[run] is None and not finite_state(finals[run]):
                diverged[run] = f"phase {phase + 1}"
                warn(diverged_text(c, phase + 1))
            model.load_state_dict(finals[run])  # run's state: its pass and its method's
            imp = None
            if method.wants_importance(c, phase) and diverged[run] is None:
                imp, s = importance_of(c, model, phase_tasks(c, tasks, phase)[phase], phase, device)
                imp_seconds[run].append(s)
            states[run] = method.after_phase(c, states[run], model, imp, phase)
        if checkpoint is not None:
            checkpoint.save(
                phase,
                {
                    "current": current,
                    "curves": curves,
                    "train_s": train_s,
                    "weights": weights,
                    "diverged": diverged,
                    "states": states,
                    "imp_seconds": imp_seconds,
                    "adam": adam,
                    "stack_seconds": stack_seconds,
                },
                last=phase == len(tasks) - 1,
            )
    compiled = compiled_step_active() and device.type == "cpu"
    meta = run_meta(
        device,
        stack=k,
        stack_seconds=stack_seconds,
        compiled_step=compiled,
        task1_state=state_fingerprint(d1.state_dict),
    )
    return [
        finish_record(
            c,
            states[run],
            firsts[run],
            imp_seconds[run],
            curves[run],
            train_s[run],
            None if weights is None else weights[run],
            diverged[run],
            ctx,
            meta,
        )
        for run, c in enumerate(configs)
    ]


def _train_phase(
    configs: Sequence[RunConfig],
    tasks: list[Task],
    phase: int,
    starts: Sequence[Mapping[str, Tensor]],
    penalties: Sequence[tuple[float, dict[str, Tensor], dict[str, Tensor]] | None],
    adam: list[AdamMoments] | None = None,
) -> tuple[list[Any], list[dict[str, Tensor]], float]:
    """Phase ``phase`` of the K runs from ``starts`` with their (λ, θ̄, F̄) penalties, stacked:
    (K curves, K final states, seconds). ``adam`` (``adam_state`` keep): the runs' Adam states
    at the start, replaced in place by those at the end."""
    first = configs[0]
    device = resolve_device(first.device)
    tasks = phase_tasks(first, tasks, phase)
    sets, unions = eval_sets(first, tasks, phase)
    same_start = all(s is starts[0] for s in starts)
    start = time.perf_counter()
    curves, finals = train_stacked(
        starts[0] if same_start else starts,
        tasks[phase].train,
        lrs=[c.lr2 for c in configs],
        lams=[0.0 if p is None else p[0] for p in penalties],
        importances=[{} if p is None else p[2] for p in penalties],
        anchors=None
        if same_start and _anchored_at(penalties, starts[0])
        else [None if p is None else p[1] for p in penalties],
        iters=first.iters2,
        batch_size=first.batch_size,
        eval_every=first.eval_every,
        eval_schedule=first.eval_schedule,
        precision=first.precision,
        seed=stream_seed(first.seed, batches_stream(phase)),
        eval_sets=sets,
        unions=unions,
        device=device,
        units=tasks[phase].units,
        eval_units=eval_units(tasks) or None,
        adam=adam,
        adam_out=adam,
    )
    synchronize(device)
    return curves, finals, time.perf_counter() - start


def _anchored_at(
    penalties: Sequence[tuple[float, dict[str, Tensor], dict[str, Tensor]] | None],
    state: Mapping[str, Tensor],
) -> bool:
    """Whether every penalty's anchor is ``state`` itself (phase 2: every run anchors task
    1's state, which the stacked engine then keeps once)."""
    return all(
        p is None or all(torch.equal(p[1][key].cpu(), state[key].cpu()) for key in state)
        for p in penalties
    )


def diverged_text(config: RunConfig, phase: int = 2) -> str:
    """The one console line for a stacked run whose phase ``phase`` (1-based) ended with
    non-finite weights (the stacked engine checks once, at the end of the phase)."""
    return (
        f"{config.slt} {method_label(config)}, λ {config.lam:g}, lr2 {config.lr2:g}, seed "
        f"{config.seed}: the weights are not finite at the end of phase {phase} (stacked; "
        "checked at the end of the phase): the run diverged and is recorded as diverged; a smaller "
        "learning rate or λ usually helps"
    )
