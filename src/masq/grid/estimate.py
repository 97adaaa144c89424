"""A grid's time, estimated from a short calibration on this machine (``--dry-run``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from masq import stacked
from masq.config import Precision, RunConfig, choice, n_params
from masq.consolidation import get_method
from masq.consolidation.imm import sweep_shares
from masq.grid.plan import (
    Group,
    chunks,
    importance_key,
    makespan,
    placement,
)
from masq.importance import get_measure
from masq.runtime import default_threads
from masq.scenarios import head_size
from masq.slt import parse_spec
from masq.training import eval_iterations


@dataclass(frozen=True)
class Estimate:
    """A time estimate of a grid from a short calibration on this machine (seconds)."""

    total: float
    d1: float
    importance: float
    d2: float
    evaluation: float
    workers: int
    threads: int
    measured: tuple[tuple[int, ...], ...]  # the widths of the nets timed, input to head
    architectures: int  # distinct nets (input, hidden and head widths) among the groups


def task_sizes(slt: str, eval_val: bool, train_on_val: bool = False) -> tuple[int, int]:
    """(D1 training samples, evaluated samples per evaluation) of an MNIST SLT, approximated
    from the class fractions: train 55,000 (60,000 with ``train_on_val``), test 10,000 and
    validation 5,000 images."""
    spec = parse_spec(slt)
    n_tasks = len(spec.task_classes)
    frac1 = len(spec.task_classes[0]) / 10
    n_eval = 10_000 * (n_tasks if spec.permuted else 1)
    if eval_val:
        n_eval += 5_000 * (n_tasks if spec.permuted else 1)
    return int((60_000 if train_on_val else 55_000) * frac1), n_eval


def _timeit(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


# Timed (short, long) pairs per cost; their median is taken. One pair misjudged a stack of
# 784-1000-1000 nets by up to a factor 2 (the fixed cost of a call, its allocations, varies
# from call to call by as much as the iterations it is subtracted from).
REPEATS = 3


def _per_iteration(
    run: Callable[[int], Any], short: int, long: int, repeats: int = REPEATS
) -> float:
    """Seconds per iteration of ``run(iters)``: the median over ``repeats`` pairs of
    (t(long) − t(short)) / (long − short), so the fixed cost of a call (setup, the evaluation
    at 0 and the end) cancels out."""
    run(short)  # warm-up
    per: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(short)
        t1 = time.perf_counter()
        run(long)
        t2 = time.perf_counter()
        per.append(max((t2 - t1) - (t1 - t0), 1e-9) / (long - short))
    return statistics.median(per)


def measure(
    hidden: tuple[int, ...],
    stack: int,
    short: int = 2,
    long: int = 8,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    measures: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 100,
    in_features: int = 784,
    classes: int = 10,
) -> dict[str, float]:
    """Seconds per: D1 training iteration (mini-batches of ``batch_size``, Adam), D2
    iteration of a stack of ``stack`` runs with the EWC penalty ("d2_iter"; ``stack=1``: one
    run, ``train_task``) and of one run ("d2_iter_one"), evaluated sample (one model / a
    stack), and importance sample (batches of 1000, forward and backward, float32), timed on
    random images of ``in_features`` pixels with a head of ``classes`` units (2,000,
    ``long - short`` iterations, the median of :data:`REPEATS` pairs) in ``precision`` on
    ``device`` (the grid's).

    ``measures`` ({measure name: its settings}, those of the grid) adds, per measure computed
    after a phase, the seconds per sample of its own pass ("importance_sample:<name>") and,
    per structured penalty kind (K-FAC, the per-layer blocks), the seconds per iteration of
    one run with that penalty ("d2_iter_one:<kind>"): their costs differ from the diagonal
    case by factors (measured: 4-5x per step on 784-30-30-10)."""
    from masq import training
    from masq.consolidation import ewc
    from masq.consolidation.penalty import QuadraticPenalty
    from masq.models import mlp
    from masq.runtime import resolve_device

    dev = resolve_device(device)
    prec = choice(Precision, precision, "precision")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2000, in_features, generator=gen).to(dev)
    y = torch.randint(0, classes, (2000,), generator=gen).to(dev)
    model = mlp(hidden, in_features=in_features, classes=classes, seed=0).to(dev)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    importance = {k: torch.rand_like(v) for k, v in state.items()}
    anchor = ewc.anchor(model, importance)

    def d1(iters: int) -> None:
        cfg = training.TrainConfig(lr=1e-3, iters=iters, batch_size=batch_size, precision=prec)
        training.train_task(model, (x, y), cfg)

    penalty = QuadraticPenalty(model, anchor, 1000.0)

    def one(iters: int) -> None:
        cfg = training.TrainConfig(lr=1e-5, iters=iters, batch_size=batch_size, precision=prec)
        training.train_task(model, (x, y), cfg, penalty_grad=penalty)

    def stacked_runs(iters: int) -> None:
        stacked.train_stacked(
            state,
            (x, y),
            lrs=[1e-5] * stack,
            lams=[1000.0] * stack,
            importances=[importance] * stack,
            iters=iters,
            batch_size=batch_size,
            eval_every=iters,
            seed=0,
            device=dev,
            precision=precision,
        )

    two = QuadraticPenalty(model, [anchor, ewc.anchor(model, importance)], 1000.0)

    def one_two_anchors(iters: int) -> None:
        cfg = training.TrainConfig(lr=1e-5, iters=iters, batch_size=batch_size, precision=prec)
        training.train_task(model, (x, y), cfg, penalty_grad=two)

    t_d1 = _per_iteration(d1, short, long)
    t_one = _per_iteration(one, short, long)
    t_anchor = max(0.0, _per_iteration(one_two_anchors, short, long) - t_one)
    t_d2 = t_one if stack <= 1 else _per_iteration(stacked_runs, short, long)
    s = stacked.stack_state(state, max(1, stack), dev)
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    t_eval_stack = _timeit(lambda: stacked.stacked_correct(s, x, y, low), 2) / x.shape[0]
    t_eval_one = (
        _timeit(lambda: training.eval_counts(model, {"x": (x, y)}, precision=precision), 2)
        / x.shape[0]
    )
    xb, yb = x[:1000], y[:1000]

    def fwd_bwd() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()

    t_imp = _timeit(fwd_bwd, 2) / 1000
    out = {
        "d1_iter": t_d1,
        "d2_iter": t_d2,
        "d2_iter_one": t_one,
        "d2_anchor": t_anchor,
        "eval_sample_one": t_eval_one,
        "eval_sample_stack": t_eval_stack,
        "importance_sample": t_imp,
    }
    for name, settings in (measures or {}).items():
        out |= _measure_costs(model, (x, y), name, settings, short, long, prec, dev, batch_size)
    return out


# Samples of a measure's timed pass in the calibration.
MEASURE_SAMPLES = 200


def _measure_costs(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    name: str,
    settings: Mapping[str, Any],
    short: int,
    long: int,
    precision: Precision,
    dev: torch.device,
    batch_size: int = 100,
) -> dict[str, float]:
    """{"importance_sample:<name>": seconds per sample of the measure's pass over its
    ``fisher_samples`` subset (else :data:`MEASURE_SAMPLES` samples)} and, for a structured
    measure, {"d2_iter_one:<kind>": seconds per iteration of one run with its penalty of one
    anchor at λ = 1000, "d2_anchor:<kind>": what each further anchor adds}."""
    from masq import training
    from masq.consolidation import ewc
    from masq.consolidation.penalty import penalty_for
    from masq.importance import MeasureContext, get_measure

    measure = get_measure(name)
    compute = measure.compute
    if compute is None:
        return {}
    n = int(settings.get("fisher_samples") or 0) or MEASURE_SAMPLES  # the run's subset size
    x, y = data[0][:n], data[1][:n]
    ctx = MeasureContext(dict(settings), 100, torch.Generator(device=dev).manual_seed(0), dev)
    imp: Any = None

    def one_pass() -> None:
        nonlocal imp
        imp = compute(model, (x, y), ctx)

    out = {f"importance_sample:{name}": _timeit(one_pass, 1) / x.shape[0]}
    if measure.kind != "diagonal":
        anchor = ewc.factor_anchor(model, imp)

        def step(anchors: int) -> Callable[[int], None]:
            penalty = penalty_for(measure.kind, model, [anchor] * anchors, 1000.0)

            def add_grad(net: torch.nn.Module) -> None:  # what the phase loop calls
                penalty.add_grad(dict(net.named_parameters()))

            def run(iters: int) -> None:
                cfg = training.TrainConfig(
                    lr=1e-5, iters=iters, batch_size=batch_size, precision=precision
                )
                training.train_task(model, data, cfg, penalty_grad=add_grad)

            return run

        one = _per_iteration(step(1), short, long)
        out[f"d2_iter_one:{measure.kind}"] = one
        out[f"d2_anchor:{measure.kind}"] = max(0.0, _per_iteration(step(2), short, long) - one)
    return out


def calibrate(
    archs: Sequence[tuple[int, ...]],
    stack: int,
    *,
    threads: int,
    max_measured: int = 3,
    precision: str = "fp32",
    device: str = "cpu",
    measures: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 100,
    in_features: int = 784,
    classes: int = 10,
) -> tuple[dict[tuple[int, ...], dict[str, float]], tuple[tuple[int, ...], ...]]:
    """Per architecture the costs of :func:`measure` (with ``measures``, mini-batches of
    ``batch_size``, inputs of ``in_features`` pixels, a head of ``classes`` units), measured
    with ``threads`` torch threads for up to ``max_measured`` architectures (smallest,
    largest, middle by parameter count) and interpolated linearly in the parameter count
    for the others; in ``precision`` on ``device``."""

    def size(h: tuple[int, ...]) -> int:
        return n_params(h, in_features, classes)

    distinct = sorted(set(archs), key=size)
    if len(distinct) <= max_measured:
        picked = distinct
    else:
        idx = sorted(
            {round(i * (len(distinct) - 1) / (max_measured - 1)) for i in range(max_measured)}
        )
        picked = [distinct[i] for i in idx]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        extra: dict[str, Any] = (
            {}
            if (precision, device) == ("fp32", "cpu")
            else {
                "precision": precision,
                "device": device,
            }
        )
        if measures:
            extra = {**extra, "measures": measures}
        if in_features != 784:
            extra = {**extra, "in_features": in_features}
        if classes != 10:
            extra = {**extra, "classes": classes}
        measured = {h: measure(h, stack, batch_size=batch_size, **extra) for h in picked}
    finally:
        torch.set_num_threads(before)
    xs = [size(h) for h in picked]
    out: dict[tuple[int, ...], dict[str, float]] = {}
    for h in distinct:
        if h in measured:
            out[h] = measured[h]
            continue
        p = size(h)
        out[h] = {
            key: _interp(p, xs, [measured[m][key] for m in picked]) for key in measured[picked[0]]
        }
    return out, tuple(picked)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear through the points, extended linearly beyond them, at least 0."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    raise AssertionError  # pragma: no cover


def imm_chunk_seconds(
    chunk: Sequence[RunConfig],
    cost: dict[str, float],
    n_train: int,
    n_eval: int,
    merge_eval: int,
) -> tuple[float, float, float]:
    """(importance, later phases, evaluation) seconds of one IMM chunk (runs trained alike,
    :func:`masq.grid.plan.chunks`): its T − 1 later phases trained once, one by one, and
    evaluated on the schedule (``n_eval`` images); an importance pass over each later task's
    training data (≈ ``n_train`` images) for every mode-IMM run; and for every run each merge of
    its α sweep evaluated on every task's test and validation sets (``merge_eval`` images)."""
    first = chunk[0]
    phases = first.n_tasks - 1
    evals = len(eval_iterations(first.iters2, first.eval_every, first.eval_schedule))
    e_train = phases * evals * n_eval * cost["eval_sample_one"]
    passing = sum(get_method(c.consolidation).wants_importance(c, 1) for c in chunk)
    passes = passing * phases * n_train * cost["importance_sample"]
    n_merges = sum(len(sweep_shares(c.alpha_step, c.n_tasks)) for c in chunk)
    merges = n_merges * merge_eval * cost["eval_sample_one"]
    train = phases * first.iters2 * cost["d2_iter_one"] + e_train + merges
    return passes, train, e_train + merges


def _run_costs(config: RunConfig, c: Mapping[str, float], n_train: int) -> tuple[float, float, int]:
    """(seconds per later-phase iteration, seconds per sample of its measure's pass, samples
    of the pass) of one run from the calibrated costs ``c``: the step with its measure's
    penalty kind and, averaged over the later phases, as many anchors as its method holds
    there (EWC one per earlier task, the others one); the pass of its measure on its
    ``fisher_samples`` subset where it reads one (else the task's ``n_train`` samples); the
    generic costs where none was measured."""
    found = get_measure(config.importance)
    suffix = "" if found.kind == "diagonal" else f":{found.kind}"
    phases = config.n_tasks - 1
    many = config.consolidation == "ewc" and found.gives_importance and config.lam > 0
    extra = (phases - 1) / 2 if many else 0.0  # anchors beyond the first, on average
    anchor = c.get(f"d2_anchor{suffix}", c.get("d2_anchor", 0.0))
    step = c.get(f"d2_iter_one{suffix}", c["d2_iter_one"]) + extra * anchor
    per_sample = c.get(f"importance_sample:{found.name}", c["importance_sample"])
    subset = config.fisher_samples if "fisher_samples" in found.reads(config) else 0
    return step, per_sample, min(n_train, subset) if subset > 0 else n_train


def _chunk_costs(
    chunk: Sequence[RunConfig], stack: int, c: dict[str, float], n_train: int, n_eval: int
) -> tuple[float, float, float]:
    """(importance passes, re-training, of which evaluation) seconds of one chunk of a group
    (:func:`masq.grid.plan.chunks`): runs trained alike as :func:`imm_chunk_seconds`, runs one
    by one each with its phases, a stack as one (a short stack costs about its share)."""
    k = len(chunk)
    phases = chunk[0].n_tasks - 1
    if placement(chunk[0], stack)[0] == "alike":
        merge_eval = task_sizes(chunk[0].slt, True)[1]
        return imm_chunk_seconds(chunk, c, n_train, n_eval, merge_eval)
    step, per_sample, samples = _run_costs(chunk[0], c, n_train)
    # as continue_run: a pass after every phase its method takes one, run by run
    later = sum(
        get_method(x.consolidation).wants_importance(x, t)
        for x in chunk
        for t in range(1, phases + 1)
    )
    imp = later * samples * per_sample  # stacked: EWC's anchors merged into one
    evals = len(eval_iterations(chunk[0].iters2, chunk[0].eval_every, chunk[0].eval_schedule))
    if placement(chunk[0], stack)[0] != "stack":  # one by one (structured, SI, ...)
        e_run = phases * evals * n_eval * c["eval_sample_one"]
        return imp, k * (phases * chunk[0].iters2 * step + e_run), k * e_run
    scale = k / max(1, stack) if stack > 1 else k
    e2 = evals * n_eval * (c["eval_sample_stack"] if stack > 1 else c["eval_sample_one"])
    return imp, phases * (chunk[0].iters2 * c["d2_iter"] + e2) * scale, phases * e2 * scale


def _calibration_key(config: RunConfig) -> tuple[str, int, int, int]:
    """What a calibration is measured at besides the hidden layers: (precision, batch size,
    input pixels (28 + 2·pad)², head units (:func:`masq.scenarios.head_size`: T·10 for
    permuted MNIST's task and class-blocks scenarios))."""
    classes = head_size(parse_spec(config.slt).task_classes, config.scenario)
    return str(config.precision), int(config.batch_size), config.in_features, classes


def estimate(
    groups: Sequence[Group], stack: int, *, workers: int, threads: int | None = None
) -> Estimate:
    """Time to run ``groups`` with ``workers`` workers of ``threads`` threads, extrapolated
    from :func:`calibrate` per precision on the grid's device, with each group's evaluation
    schedule; IMM chunks as :func:`imm_chunk_seconds`. The total is the wall time of the
    executor's jobs on ``workers`` workers (:func:`masq.grid.plan.makespan`: largest job
    first, each to the first free worker), not the work divided by ``workers``: a grid whose
    largest job is longer than the rest's share ends with that job alone. The parts (task-1
    training, importance, re-training, evaluation) are the work's shares of that wall time."""
    threads = default_threads(workers) if threads is None else threads
    archs = [c.hidden for g in groups for c in g.configs[:1]]
    if not archs:
        return Estimate(0.0, 0.0, 0.0, 0.0, 0.0, workers, threads, (), 0)
    device = str(groups[0].configs[0].device)
    measures: dict[str, Mapping[str, Any]] = {}
    for g in groups:
        for config in g.configs:
            found = get_measure(config.importance)
            if found.compute is not None and found.name not in measures:
                measures[found.name] = found.settings(config)
    costs: dict[tuple[tuple[int, ...], str, int, int, int], dict[str, float]] = {}
    picked: tuple[tuple[int, ...], ...] = ()  # widths of the nets timed
    archs_at: dict[tuple[str, int, int, int], list[tuple[int, ...]]] = {}  # per key
    for g in groups:
        archs_at.setdefault(_calibration_key(g.configs[0]), []).append(g.configs[0].hidden)
    for (precision, batch, pixels, classes), of_p in archs_at.items():
        kw: dict[str, Any] = (
            {}
            if (precision, device) == ("fp32", "cpu")
            else {
                "precision": precision,
                "device": device,
            }
        )
        if pixels != 784:
            kw["in_features"] = pixels
        if classes != 10:
            kw["classes"] = classes
        measured, chosen = calibrate(
            of_p, stack, threads=threads, measures=measures, batch_size=batch, **kw
        )
        costs |= {(h, precision, batch, pixels, classes): v for h, v in measured.items()}
        picked = tuple(dict.fromkeys((*picked, *((pixels, *h, classes) for h in chosen))))
    parts: list[list[tuple[tuple[RunConfig, ...], float]]] = []  # per group: (chunk, seconds)
    shared: list[tuple[float, float]] = []  # per group: task-1 training, importance passes
    d1 = imp = d2 = ev = 0.0
    for g in groups:
        first = g.configs[0]
        c = costs[(first.hidden, *_calibration_key(first))]
        n_train, n_eval = task_sizes(first.slt, first.eval_val, first.train_on_val)
        evals1 = len(eval_iterations(first.iters1, first.eval_every, first.eval_schedule))
        e1 = evals1 * n_eval * c["eval_sample_one"]
        g_d1 = first.iters1 * c["d1_iter"] + e1
        g_imp = 0.0
        for key in g.importance_keys:
            config = next(x for x in g.configs if importance_key(x) == key)
            _, per_sample, samples = _run_costs(config, c, n_train)
            g_imp += samples * per_sample
        d1, imp, ev = d1 + g_d1, imp + g_imp, ev + e1
        shared.append((g_d1, g_imp))
        parts.append([])
        for chunk in chunks(g.configs, stack):
            i_s, d2_s, ev_s = _chunk_costs(chunk, stack, c, n_train, n_eval)
            imp, d2, ev = imp + i_s, d2 + d2_s, ev + ev_s
            parts[-1].append((tuple(chunk), i_s + d2_s))
    work = d1 + imp + d2
    wall = makespan(parts, shared, workers)
    share = wall / work if work > 0 else 0.0
    return Estimate(
        wall,
        d1 * share,
        imp * share,
        d2 * share,
        ev * share,
        workers,
        threads,
        picked,
        len({(k[2], *h, k[3]) for k, hs in archs_at.items() for h in hs}),  # distinct widths
    )
