"""Phases 2..T of K runs that share task 1's state, trained at once (:mod:`masq.stacked`).

For two-task runs (the paper's protocol) the K re-trainings of a grid group run as one
stacked model: the same mini-batch stream (the "d2-batches" stream of the shared seed),
evaluation sets and points as K :func:`~masq.protocol.run.continue_run` calls, and records
of the same format built by the same :func:`~masq.protocol.result.build_result`
(``timings["train"][1]`` is the stack's time / K; ``meta["stack"]`` = K).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from torch import Tensor

from masq.config import RunConfig
from masq.consolidation import check_config, get_method, method_label
from masq.errors import ConfigError
from masq.fileio import warn
from masq.importance import get_measure
from masq.protocol.result import Result, build_result, finite_state, run_meta
from masq.protocol.run import D1State, check_same_d1, eval_sets, eval_units, synchronize
from masq.runtime import resolve_device
from masq.stacked import train_stacked
from masq.streams import batches_stream, stream_seed
from masq.tasks import Task


def stackable(config: RunConfig) -> str | None:
    """Why ``config`` cannot be stacked, or None when it can: the stacked engine trains the
    second phase of two-task runs of the MLP with a diagonal quadratic penalty, so it takes
    the methods that declare ``stackable`` (EWC) with any diagonal measure computed before
    that phase (a structured one, K-FAC, goes one by one)."""
    method = get_method(config.consolidation)
    if config.n_tasks != 2:
        return f"{config.n_tasks} tasks (the stacked engine runs two-task runs)"
    if not method.stackable:
        return f"consolidation {method.name!r} is not stacked (its phases are not plain EWC)"
    kind = get_measure(config.importance).kind
    if kind != "diagonal":
        return (
            f"importance {config.importance!r} is structured ({kind}); the stacked engine's "
            "penalty is diagonal"
        )
    return None


def continue_stacked(
    configs: Sequence[RunConfig],
    d1: D1State,
    importances: Sequence[Mapping[str, Tensor]],
    tasks: list[Task],
    importance_seconds: Sequence[float] | None = None,
    *,
    keep_weights: bool = False,
) -> list[Result]:
    """:func:`~masq.protocol.run.continue_run` for K two-task configs sharing ``d1``."""
    configs = [check_config(c) for c in configs]
    if not configs:
        return []
    first = configs[0]
    for c in configs:
        check_same_d1(c, d1)
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
    seconds_imp = list(importance_seconds or [0.0] * len(configs))
    device = resolve_device(first.device)
    sets, unions = eval_sets(first, tasks, 1)
    consolidated = [get_measure(c.importance).gives_importance for c in configs]
    imps = [dict(imp) if on else {} for on, imp in zip(consolidated, importances, strict=True)]
    for on, imp in zip(consolidated, imps, strict=True):
        if on and set(imp) != set(d1.state_dict):
            raise ConfigError(
                f"stacked: importance keys {sorted(imp)} do not match the model's "
                f"{sorted(d1.state_dict)}; compute the importance on this task-1 state"
            )
    start = time.perf_counter()
    curves, finals = train_stacked(
        d1.state_dict,
        tasks[1].train,
        lrs=[c.lr2 for c in configs],
        lams=[c.lam if on else 0.0 for c, on in zip(configs, consolidated, strict=True)],
        importances=imps,
        iters=first.iters2,
        batch_size=first.batch_size,
        eval_every=first.eval_every,
        eval_schedule=first.eval_schedule,
        precision=first.precision,
        seed=stream_seed(first.seed, batches_stream(1)),
        eval_sets=sets,
        unions=unions,
        device=device,
        units=tasks[1].units,
        eval_units=eval_units(tasks) or None,
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    k = len(configs)
    meta = run_meta(device, stack=k, stack_seconds=seconds)
    start_finite = finite_state(d1.state_dict)  # else diverged in phase 1, reported there
    diverged = [None if finite_state(f) else "phase 2" for f in finals]
    for c, where in zip(configs, diverged, strict=True):
        if start_finite and where:
            warn(diverged_text(c))
    rows = zip(configs, curves, imps, seconds_imp, finals, diverged, strict=True)
    return [
        build_result(
            c,
            [d1.curve, curve],
            importance=imp,
            train_seconds=[d1.seconds, seconds / k],
            importance_seconds=[s_imp],
            meta=meta,
            weights=[dict(d1.state_dict), final] if keep_weights else None,
            diverged="phase 1" if not start_finite else where,
        )
        for c, curve, imp, s_imp, final, where in rows
    ]


def diverged_text(config: RunConfig) -> str:
    """The one console line for a stacked run whose phase 2 ended with non-finite weights
    (the stacked engine checks once, at the end of the phase)."""
    return (
        f"{config.slt} {method_label(config)}, λ {config.lam:g}, lr2 {config.lr2:g}, seed "
        f"{config.seed}: the weights are not finite at the end of phase 2 (stacked; checked at "
        "the end of the phase): the run diverged and is recorded as diverged; a smaller "
        "learning rate or λ usually helps"
    )
