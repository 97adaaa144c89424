"""The one phase loop (module docstring of :mod:`masq.protocol.run`): phases 2..T of one or
more runs from a shared task-1 state, and ``run``.

Runs whose phases train alike (equal :meth:`~masq.consolidation.Method.shared_training` keys:
mean- and mode-IMM with any importance and α grid) go through :func:`continue_runs` together:
the loop trains once and, at the end of every phase, computes each run's importance (once per
distinct measure setting) and advances each run's method state; each gets its own end (merge)
and record. A single run is the case of one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from masq.config import RunConfig
from masq.consolidation import PhasePlan, check_config, get_method
from masq.errors import ConfigError
from masq.importance import Importance, get_measure
from masq.protocol.result import (
    Result,
    build_result,
    finite_state,
    run_meta,
    state_fingerprint,
)
from masq.protocol.resume import PhaseCheckpoint
from masq.protocol.run import (
    D1State,
    build_model,
    carried_adam,
    check_same_d1,
    check_tasks,
    compute_importance,
    cpu_state,
    importance_of,
    make_tasks,
    make_tracker,
    merged_accuracies,
    model_at,
    phase_optimizer,
    phase_tasks,
    train_first,
    train_phase,
)
from masq.runtime import resolve_device
from masq.streams import stream_seed
from masq.tasks import Task
from masq.training import heartbeat


@dataclass
class Context:
    """What the loop offers a method (:class:`~masq.consolidation.PhaseContext`): the device,
    the run's stream seeds, evaluation of a parameter set (a network built once)."""

    config: RunConfig
    tasks: list[Task]
    device: torch.device
    _model: nn.Module | None = field(default=None, repr=False)

    def seed(self, stream: str) -> int:
        """:func:`masq.streams.stream_seed` of the run's seed."""
        return stream_seed(self.config.seed, stream)

    def evaluate(self, params: Mapping[str, Tensor]) -> dict[str, float]:
        """:func:`masq.protocol.run.merged_accuracies` of ``params``."""
        if self._model is None:
            self._model = build_model(self.config, self.tasks).to(self.device)
        return merged_accuracies(self.config, self.tasks, self._model, params)


@dataclass
class _Run:
    """One run's side of the loop: its config, method, state, importances and their times."""

    config: RunConfig
    state: Any
    first: Importance | None
    seconds: list[float]


def _wants(config: RunConfig, phase: int) -> bool:
    """Whether ``config``'s method takes the importance after phase ``phase``."""
    return get_method(config.consolidation).wants_importance(config, phase)


def _check_alike(configs: Sequence[RunConfig]) -> None:
    """ConfigError unless every config trains its phases like the first."""
    if len(configs) == 1:
        return
    keys = {get_method(c.consolidation).shared_training(c) for c in configs}
    if None in keys or len(keys) > 1:
        raise ConfigError(
            "continue_runs: these runs do not train alike (Method.shared_training differs); "
            "continue them one by one"
        )
    tracked = {c.importance for c in configs if get_measure(c.importance).tracker is not None}
    if tracked and tracked != {configs[0].importance}:
        raise ConfigError(
            "continue_runs: a measure tracked during training must be the first run's; "
            "continue these runs one by one"
        )


def continue_runs(
    configs: Sequence[RunConfig],
    d1: D1State,
    importances: Sequence[tuple[Mapping[str, Tensor], float]],
    tasks: list[Task],
    *,
    progress: bool = False,
    keep_weights: bool = False,
    checkpoint: PhaseCheckpoint | None = None,
) -> list[Result]:
    """Phases 2..T of ``configs`` (which train alike) from the task-1 state ``d1``, each with
    its task-1 (importance, seconds); the loop of the module docstring. One record each.
    ``checkpoint``: the loop's state is saved there between phases, and a state found there is
    resumed (:mod:`masq.protocol.resume`)."""
    configs = [check_config(c) for c in configs]
    _check_alike(configs)
    for c in configs:
        check_same_d1(c, d1)
        check_tasks(c, tasks)
    lead = configs[0]
    device = resolve_device(lead.device)
    model = model_at(lead, d1.state_dict, tasks).to(device)
    optimizer = phase_optimizer(lead, model, carried_adam(lead, d1))  # None: fresh per phase
    diverged = None if finite_state(d1.state_dict) else "phase 1"
    runs: list[_Run] = []
    for c, (given, seconds) in zip(configs, importances, strict=True):
        method, wants = get_method(c.consolidation), _wants(c, 0)
        first = dict(given) if wants and get_measure(c.importance).gives_importance else None
        state = method.after_phase(c, method.init(c), model, first if not diverged else None, 0)
        runs.append(_Run(c, state, first, [float(seconds)] if wants else []))
    curves, train_s = [d1.curve], [d1.seconds]
    weights = [dict(d1.state_dict)] if keep_weights else None
    lead_method, ctx = get_method(lead.consolidation), Context(lead, tasks, device)
    start = 1
    loaded = None if checkpoint is None else checkpoint.load(device)
    if loaded is not None:
        done, saved = loaded
        model.load_state_dict(saved["model"])
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        for r, (state, seconds) in zip(runs, saved["runs"], strict=True):
            r.state, r.seconds = state, seconds
        curves, train_s, weights = saved["curves"], saved["train_s"], saved["weights"]
        diverged, start = saved["diverged"], done + 1
        heartbeat.restored(done * lead.iters2)  # the steps of the phases done before
    for phase in range(start, len(tasks)):
        plan = lead_method.before_phase(lead, runs[0].state, model, phase, ctx)
        if diverged is not None:  # a non-finite state anchors nothing
            plan = PhasePlan(wrap=plan.wrap)
        wanted = [_wants(r.config, phase) for r in runs]
        seen = phase_tasks(lead, tasks, phase)[phase]  # its units where class_units is seen
        tracker = make_tracker(lead, model, seen, phase, device) if any(wanted) else None
        curve, seconds = train_phase(
            lead,
            tasks,
            model,
            phase,
            plan=plan,
            tracker=tracker,
            device=device,
            progress=progress,
            optimizer=optimizer,
        )
        curves.append(curve)
        train_s.append(seconds)
        if diverged is None and not finite_state(dict(model.named_parameters())):
            diverged = f"phase {phase + 1}"
        if weights is not None:
            weights.append(cpu_state(model))
        passes: dict[Any, tuple[Importance, float]] = {}
        for run, wants in zip(runs, wanted, strict=True):
            imp = None
            if wants and diverged is None:
                measure = get_measure(run.config.importance)
                key = (measure.name, tuple(sorted(measure.settings(run.config).items())))
                if key not in passes:
                    own = tracker if run.config.importance == lead.importance else None
                    passes[key] = importance_of(run.config, model, seen, phase, device, own)
                imp, s = passes[key]
                run.seconds.append(s)
            method = get_method(run.config.consolidation)
            run.state = method.after_phase(run.config, run.state, model, imp, phase)
        if checkpoint is not None:
            checkpoint.save(
                phase,
                {
                    "model": model.state_dict(),
                    "optimizer": None if optimizer is None else optimizer.state_dict(),
                    "runs": [(r.state, r.seconds) for r in runs],
                    "curves": curves,
                    "train_s": train_s,
                    "weights": weights,
                    "diverged": diverged,
                },
                last=phase == len(tasks) - 1,
            )
    meta = run_meta(ctx.device, task1_state=state_fingerprint(d1.state_dict))
    return [
        finish_record(
            r.config, r.state, r.first, r.seconds, curves, train_s, weights, diverged, ctx, meta
        )
        for r in runs
    ]


def finish_record(
    config: RunConfig,
    state: Any,
    first: Importance | None,
    importance_seconds: list[float],
    curves: list[Any],
    train_s: list[float],
    weights: list[dict[str, Tensor]] | None,
    diverged: str | None,
    ctx: Context,
    meta: Mapping[str, Any] | None = None,
) -> Result:
    """The record of one run: :func:`build_result` (``meta`` default:
    :func:`~masq.protocol.result.run_meta` of the device), then the method's end (unless
    diverged) evaluated through ``ctx``, one network for all the runs that trained alike (their
    seed, tasks and precision are one)."""
    result = build_result(
        config,
        curves,
        importance=first,
        train_seconds=train_s,
        importance_seconds=importance_seconds,
        meta=dict(meta) if meta is not None else run_meta(ctx.device),
        weights=None if weights is None else [dict(w) for w in weights],
        diverged=diverged,
    )
    method = get_method(config.consolidation)
    end = None if diverged else method.end(config, state, ctx)
    if end is not None:
        result.metrics.update(end.metrics)
        result.timings["merge"] = [end.seconds]
        if method.record_key:
            setattr(result, method.record_key, end.record)
    return result


def continue_run(
    config: RunConfig,
    d1: D1State,
    importance: Mapping[str, Tensor],
    tasks: list[Task],
    importance_seconds: float = 0.0,
    *,
    progress: bool = False,
    keep_weights: bool = True,
    checkpoint: PhaseCheckpoint | None = None,
) -> Result:
    """Phases 2..T of one run from the state ``d1`` with task 1's ``importance`` (module
    docstring of :mod:`masq.protocol.run`). ``keep_weights`` keeps the state at the end of
    every phase in the result; ``checkpoint`` as :func:`continue_runs`'."""
    return continue_runs(
        [config],
        d1,
        [(importance, importance_seconds)],
        tasks,
        progress=progress,
        keep_weights=keep_weights,
        checkpoint=checkpoint,
    )[0]


def run(
    config: RunConfig,
    *,
    progress: bool = False,
    data_dir: str | None = None,
    tasks: list[Task] | None = None,
    keep_weights: bool = True,
    checkpoint: PhaseCheckpoint | None = None,
) -> Result:
    """The whole protocol for one config: tasks, phase 1, task 1's importance, phases 2..T
    and the method's end (IMM's merge). ``checkpoint`` as :func:`continue_runs`' (a resumed
    run trains task 1 again: its state is not kept, and training it is deterministic)."""
    check_config(config)
    resolve_device(config.device)
    tasks = make_tasks(config, data_dir=data_dir) if tasks is None else tasks
    d1 = train_first(config, tasks, progress=progress)
    importance, seconds = compute_importance(config, d1, tasks)
    return continue_run(
        config,
        d1,
        importance,
        tasks,
        seconds,
        progress=progress,
        keep_weights=keep_weights,
        checkpoint=checkpoint,
    )


__all__ = ["Context", "continue_run", "continue_runs", "finish_record", "run"]
