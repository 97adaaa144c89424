"""Exhaustive grid search (PAPER.md section 5.1): grids, shared work, executors.

A :class:`Grid` lists values per axis; :func:`expand` takes their product and turns every
combination into an :class:`~masq.experiment.ExperimentConfig`. The λ axis has two readings
(PAPER.md section 2): absolute values (``lam``) and multiples of the re-training rate,
λ = c / ε2 (``lam_per_lr2``); both may be given and their values are joined.

Doing the work once. Runs that share the fields of ``experiment.D1_FIELDS`` start from the same
D1 state: a :class:`Group`. Each group trains D1 once and computes each importance (the
fields of ``experiment.IMPORTANCE_FIELDS``) once; both are cached in the results dir, so a
resumed grid does not redo them. λ = 0 runs do not depend on the importance: they are
canonicalized to ``importance="none"`` (and default importance settings) and run once.
The D2 runs of a group are re-trained K at a time as one stacked model (:mod:`masq.stacked`,
``stack=K``; ``stack=1`` runs :func:`masq.experiment.retrain_d2` one by one).

Executors. ``local``: a pool of ``workers`` spawned processes, ``cores // workers`` torch
threads each, one group per task (``workers=1`` runs in this process). ``ray``: the same
groups as ``ray.remote`` tasks on a Ray cluster. Either way each finished run is written to
the store as soon as its stack finishes; failed runs are recorded in DIR/errors and the grid
goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from masq import experiment, stacked
from masq.errors import ConfigError
from masq.experiment import D1_FIELDS, IMPORTANCE_FIELDS, D1State, ExperimentConfig
from masq.results import Store, config_dict, key_of, run_id
from masq.tasks import Task, parse_spec
from masq.train import eval_iterations

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PAPER_SIZES: tuple[int, ...] = (200, 400, 800)
PAPER_LAYERS: tuple[int, ...] = (2, 3)
LAM_DIGITS = 12  # λ = c / ε2 is rounded to this many significant digits (0.1/1e-3 -> 100.0)
TasksFn = Callable[[ExperimentConfig], list[Task]]
_DEFAULT = ExperimentConfig()

# Which importance fields matter for each importance kind; the others are set to their
# defaults so that runs differing only in an irrelevant field are one run.
RELEVANT_IMPORTANCE_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "masq": ("masq_batch", "scale"),
    "fisher": ("fisher_labels",),
}


def architectures(layers: Iterable[int], sizes: Iterable[int]) -> tuple[tuple[int, ...], ...]:
    """Every net with L in ``layers`` hidden layers, each of a size in ``sizes`` independently.

    ``architectures((2, 3), (200, 400, 800))`` has 3^2 + 3^3 = 36 entries.
    """
    sizes = tuple(sizes)
    return tuple(arch for n in layers for arch in itertools.product(sizes, repeat=int(n)))


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    """Values per axis; the grid is their product (see :func:`expand`).

    Every axis is a tuple named like the ExperimentConfig field it sets, except ``seed`` (the
    seeds to repeat every run with), ``lam`` (absolute λ values) and ``lam_per_lr2`` (values c
    giving λ = c / ε2). The defaults are one run with ExperimentConfig's defaults; the paper's
    grid is the preset ``paper`` (:func:`load_preset`).
    """

    slt: tuple[str, ...] = (_DEFAULT.slt,)
    dataset: tuple[str, ...] = (_DEFAULT.dataset,)
    hidden: tuple[tuple[int, ...], ...] = (_DEFAULT.hidden,)
    init: tuple[str, ...] = (_DEFAULT.init,)
    lr1: tuple[float, ...] = (_DEFAULT.lr1,)
    iters1: tuple[int, ...] = (_DEFAULT.iters1,)
    batch_size: tuple[int, ...] = (_DEFAULT.batch_size,)
    eval_every: tuple[int, ...] = (_DEFAULT.eval_every,)
    eval_val: tuple[bool, ...] = (_DEFAULT.eval_val,)
    seed: tuple[int, ...] = (_DEFAULT.seed,)
    importance: tuple[str, ...] = (_DEFAULT.importance,)
    masq_batch: tuple[int, ...] = (_DEFAULT.masq_batch,)
    scale: tuple[str, ...] = (_DEFAULT.scale,)
    fisher_labels: tuple[str, ...] = (_DEFAULT.fisher_labels,)
    iters2: tuple[int, ...] = (_DEFAULT.iters2,)
    lr2: tuple[float, ...] = (_DEFAULT.lr2,)
    lam: tuple[float, ...] = (_DEFAULT.lam,)
    lam_per_lr2: tuple[float, ...] = ()
    device: str = _DEFAULT.device

    def axes(self) -> dict[str, tuple[Any, ...]]:
        """{axis name: values} for every axis (``device`` is not an axis)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "device"
        }

    def check(self) -> Grid:
        """Raise ConfigError for an empty axis (λ: both readings empty); else self."""
        for name, values in self.axes().items():
            if name in ("lam", "lam_per_lr2"):
                continue
            if len(values) == 0:
                raise ConfigError(f"grid axis {name!r} is empty; give at least one value")
        if not self.lam and not self.lam_per_lr2:
            raise ConfigError("grid axis 'lam' is empty; give --lam and/or --lam-per-lr2 values")
        return self

    def size(self) -> int:
        """The number of combinations before de-duplication: the product of the axes' lengths
        (the λ axis counts ``len(lam) + len(lam_per_lr2)``)."""
        axes = self.axes()
        n_lam = len(axes.pop("lam")) + len(axes.pop("lam_per_lr2"))
        return n_lam * math.prod(len(v) for v in axes.values())


GRID_KEYS: tuple[str, ...] = (
    *(f.name for f in dataclasses.fields(Grid)),
    "seeds",
    "layers",
    "sizes",
)
_ELEMENT_TYPES: dict[str, type] = {
    "slt": str,
    "dataset": str,
    "init": str,
    "importance": str,
    "scale": str,
    "fisher_labels": str,
    "lr1": float,
    "lr2": float,
    "lam": float,
    "lam_per_lr2": float,
    "iters1": int,
    "iters2": int,
    "batch_size": int,
    "eval_every": int,
    "masq_batch": int,
    "seed": int,
    "eval_val": bool,
}


def parse_hidden(value: Any, where: str) -> tuple[int, ...]:
    """One architecture from [800, 400] or "800-400" (or "800x400"), else ConfigError."""
    if isinstance(value, str):
        parts = value.replace("x", "-").replace(",", "-").split("-")
        try:
            sizes = tuple(int(p) for p in parts if p.strip() != "")
        except ValueError:
            raise ConfigError(
                f"{where}: bad architecture {value!r}; write hidden sizes like 800-400-400"
            ) from None
    elif isinstance(value, list | tuple):
        sizes = tuple(value)
    else:
        raise ConfigError(f"{where}: bad architecture {value!r}; write e.g. [800, 400] or 800-400")
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ConfigError(f"{where}: bad architecture {value!r}; sizes must be positive integers")
    return sizes


def _element(value: Any, kind: type, key: str, where: str) -> Any:
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, kind) and not isinstance(value, bool)
        if kind is not float
        else isinstance(value, int | float) and not isinstance(value, bool)
    )
    if not ok:
        raise ConfigError(f"{where}: grid key {key!r} takes {kind.__name__} values, got {value!r}")
    return float(value) if kind is float else value


def _values(value: Any, key: str, where: str) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if len(values) == 0 and key != "lam" and key != "lam_per_lr2":
        raise ConfigError(f"{where}: grid axis {key!r} is empty; give at least one value")
    return values


def grid_from_mapping(
    values: Mapping[str, Any], base: Grid | None = None, where: str = "grid"
) -> Grid:
    """``base`` (default ``Grid()``) with the axes named in ``values`` replaced.

    Keys: every Grid field, plus ``seeds`` (an int N: seeds 0..N-1, or a list), ``layers`` and
    ``sizes`` (all architectures with that many layers of those sizes; instead of ``hidden``).
    A scalar is a one-value axis. Giving ``lam`` or ``lam_per_lr2`` replaces both λ readings of
    ``base``. Unknown keys, empty axes and values of the wrong type are ConfigErrors.
    """
    base = Grid() if base is None else base
    unknown = sorted(set(values) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown grid key {unknown[0]!r}; known keys: {', '.join(GRID_KEYS)}"
        )
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("hidden", "layers", "sizes", "seeds", "device"):
            continue
        kind = _ELEMENT_TYPES[key]
        changes[key] = tuple(_element(v, kind, key, where) for v in _values(value, key, where))
    if "seeds" in values:
        if "seed" in values:
            raise ConfigError(
                f"{where}: give either 'seeds' (a count) or 'seed' (a list), not both"
            )
        seeds = values["seeds"]
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds <= 0:
                raise ConfigError(f"{where}: 'seeds' must be a positive count, got {seeds}")
            changes["seed"] = tuple(range(seeds))
        else:
            vals = _values(seeds, "seeds", where)
            changes["seed"] = tuple(_element(v, int, "seeds", where) for v in vals)
    if "hidden" in values and ("layers" in values or "sizes" in values):
        raise ConfigError(f"{where}: give either 'hidden' or 'layers' + 'sizes', not both")
    if "hidden" in values:
        archs = _values(values["hidden"], "hidden", where)
        if archs and all(isinstance(a, int) for a in archs):
            archs = [archs]  # hidden = [800, 800]: one architecture
        changes["hidden"] = tuple(parse_hidden(a, f"{where}: 'hidden'") for a in archs)
    elif "layers" in values or "sizes" in values:
        layers = _values(
            values.get("layers", sorted({len(h) for h in base.hidden})), "layers", where
        )
        sizes = _values(
            values.get("sizes", sorted({s for h in base.hidden for s in h})), "sizes", where
        )
        layers = [_element(v, int, "layers", where) for v in layers]
        sizes = [_element(v, int, "sizes", where) for v in sizes]
        if any(n <= 0 for n in layers) or any(s <= 0 for s in sizes):
            raise ConfigError(f"{where}: 'layers' and 'sizes' must be positive integers")
        changes["hidden"] = architectures(layers, sizes)
    if "device" in values:
        if not isinstance(values["device"], str):
            raise ConfigError(f"{where}: 'device' takes one string, e.g. \"cpu\"")
        changes["device"] = values["device"]
    if ("lam" in changes) != ("lam_per_lr2" in changes):
        other = "lam_per_lr2" if "lam" in changes else "lam"
        changes[other] = ()
    return dataclasses.replace(base, **changes).check()


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a one-line ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"grid file {str(p)!r}: cannot read it ({err.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"grid file {str(p)!r}: malformed TOML: {err}") from None


def load_grid_file(path: str | os.PathLike[str], base: Grid | None = None) -> Grid:
    """``base`` with the axes of TOML grid file ``path`` (keys as :func:`grid_from_mapping`)."""
    return grid_from_mapping(read_toml(path), base, where=str(path))


def list_presets() -> list[str]:
    """The names of the grid presets shipped with masq (``masq grid --preset NAME``)."""
    folder = resources.files("masq").joinpath("presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> Grid:
    """The grid of preset ``name`` (e.g. "paper": PAPER.md section 5.1); unknown: ConfigError."""
    names = list_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(names)}")
    resource = resources.files("masq").joinpath("presets", f"{name}.toml")
    try:
        values = tomllib.loads(resource.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:  # pragma: no cover - shipped files are tested
        raise ConfigError(f"preset {name!r}: malformed TOML: {err}") from None
    return grid_from_mapping(values, Grid(), where=f"preset {name}")


# ----------------------------------------------------------------------------- expansion


def round_sig(x: float, digits: int = LAM_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (so 0.1 / 1e-3 gives exactly 100.0)."""
    return float(f"{x:.{digits}g}")


def lam_values(grid: Grid, lr2: float) -> list[float]:
    """The λ values at re-training rate ``lr2``: ``lam`` then c / lr2 for c in ``lam_per_lr2``."""
    return [float(v) for v in grid.lam] + [round_sig(c / lr2) for c in grid.lam_per_lr2]


def canonical(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with the fields that cannot affect its result set to their defaults.

    λ = 0 (or importance "none") is one run whatever the importance: importance "none",
    λ = 0 and default importance settings. For "masq" the Fisher label source is irrelevant,
    for "fisher" the MaSQ batch and scale (:data:`RELEVANT_IMPORTANCE_FIELDS`). Floats are
    coerced to float.
    """
    default = _DEFAULT
    changes: dict[str, Any] = {f: float(getattr(config, f)) for f in ("lr1", "lr2", "lam")}
    changes["hidden"] = tuple(int(h) for h in config.hidden)
    kind = "none" if config.lam == 0 or config.importance == "none" else config.importance
    if kind == "none":
        changes["lam"] = 0.0
        changes["importance"] = "none"
    relevant = RELEVANT_IMPORTANCE_FIELDS.get(kind, IMPORTANCE_FIELDS)
    for name in IMPORTANCE_FIELDS:
        if name != "importance" and name not in relevant:
            changes[name] = getattr(default, name)
    return dataclasses.replace(config, **changes)


def expand(grid: Grid) -> list[ExperimentConfig]:
    """Every configuration of ``grid``: the product of its axes, canonicalized
    (:func:`canonical`), validated and de-duplicated (first occurrence kept).

    The order keeps runs of one D1 group together: SLT, dataset, seed, architecture, the
    other D1 fields, then the importance settings, D2 iterations, ε2 and λ.
    """
    grid.check()
    outer = (
        "slt",
        "dataset",
        "seed",
        "hidden",
        "init",
        "lr1",
        "iters1",
        "batch_size",
        "eval_every",
        "eval_val",
        "importance",
        "masq_batch",
        "scale",
        "fisher_labels",
        "iters2",
        "lr2",
    )
    seen: set[str] = set()
    configs: list[ExperimentConfig] = []
    for combo in itertools.product(*(getattr(grid, name) for name in outer)):
        values = dict(zip(outer, combo, strict=True))
        for lam in lam_values(grid, values["lr2"]):
            config = ExperimentConfig(**values, lam=lam, device=grid.device)
            config = canonical(config)
            rid = run_id(config)
            if rid in seen:
                continue
            seen.add(rid)
            configs.append(config.validate())
    return configs


# ----------------------------------------------------------------------------- shared work


def d1_key(config: ExperimentConfig) -> str:
    """The cache key of a D1 state: a hash of the ``D1_FIELDS`` of ``config``."""
    d = config_dict(config)
    return key_of({name: d[name] for name in D1_FIELDS})


def importance_key(config: ExperimentConfig) -> str:
    """The cache key of an importance pass: a hash of ``D1_FIELDS + IMPORTANCE_FIELDS``."""
    d = config_dict(config)
    return key_of({name: d[name] for name in (*D1_FIELDS, *IMPORTANCE_FIELDS)})


@dataclass(frozen=True)
class Group:
    """The runs that start from one D1 state (same ``D1_FIELDS``)."""

    key: str
    configs: tuple[ExperimentConfig, ...]

    @property
    def importance_keys(self) -> list[str]:
        """The distinct importance passes this group needs (λ = 0 runs need none)."""
        keys = [importance_key(c) for c in self.configs if c.importance != "none"]
        return list(dict.fromkeys(keys))


def plan(configs: Sequence[ExperimentConfig]) -> list[Group]:
    """``configs`` grouped by D1 state, in order of first appearance."""
    groups: dict[str, list[ExperimentConfig]] = {}
    for config in configs:
        groups.setdefault(d1_key(config), []).append(config)
    return [Group(key, tuple(cs)) for key, cs in groups.items()]


@dataclass(frozen=True)
class Work:
    """What a list of runs costs in shared units."""

    runs: int
    d1_trainings: int
    importance_passes: int
    d2_runs: int
    stacks: int


def work(groups: Sequence[Group], stack: int) -> Work:
    """The counts of D1 trainings, importance passes, D2 runs and stacks of ``groups``."""
    stacks = sum(len(chunks(g.configs, stack)) for g in groups)
    runs = sum(len(g.configs) for g in groups)
    passes = sum(len(g.importance_keys) for g in groups)
    return Work(runs, len(groups), passes, runs, stacks)


def chunks(configs: Sequence[ExperimentConfig], stack: int) -> list[list[ExperimentConfig]]:
    """The D2 runs of one group cut into stacks of at most ``stack`` with equal ``iters2``."""
    by_iters: dict[int, list[ExperimentConfig]] = {}
    for config in configs:
        by_iters.setdefault(config.iters2, []).append(config)
    out: list[list[ExperimentConfig]] = []
    for cs in by_iters.values():
        out += [cs[i : i + stack] for i in range(0, len(cs), stack)]
    return out


# ----------------------------------------------------------------------------- one group


@dataclass(frozen=True)
class GroupJob:
    """One unit of work for an executor: a group's runs and how to run them (picklable)."""

    root: str
    configs: tuple[ExperimentConfig, ...]
    stack: int = 16
    threads: int | None = None
    tasks_fn: TasksFn | None = None  # default: experiment.make_tasks
    return_records: bool = False  # send finished records back (Ray without a shared disk)


@dataclass
class GroupOutcome:
    """What a group's job did: ids finished, ids failed (with messages), work done."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    records: dict[str, str] = field(default_factory=dict)
    d1_trained: int = 0
    importance_computed: int = 0
    seconds: float = 0.0


_TASKS_CACHE: dict[tuple[Any, ...], list[Task]] = {}


def tasks_for(config: ExperimentConfig, tasks_fn: TasksFn | None) -> list[Task]:
    """The tasks of ``config`` (SLT, dataset, seed), cached per process (last one only)."""
    fn = experiment.make_tasks if tasks_fn is None else tasks_fn
    key = (
        getattr(fn, "__module__", None),
        getattr(fn, "__qualname__", repr(fn)),
        config.slt,
        config.dataset,
        config.seed,
    )
    if key not in _TASKS_CACHE:
        _TASKS_CACHE.clear()
        _TASKS_CACHE[key] = fn(config)
    return _TASKS_CACHE[key]


def load_or_train_d1(
    store: Store, config: ExperimentConfig, tasks: list[Task]
) -> tuple[D1State, bool]:
    """The D1 state of ``config`` from the store's cache, else trained (and cached)."""
    path = store.d1 / f"{d1_key(config)}.pt"
    saved = store.load_tensors(path)
    if saved is not None:
        state = D1State(
            config=ExperimentConfig.from_dict(saved["config"]),
            state_dict=saved["state_dict"],
            curve=saved["curve"],
            seconds=float(saved["seconds"]),
        )
        return state, False
    state = experiment.train_d1(config, tasks)
    payload = {
        "config": state.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in state.state_dict.items()},
        "curve": state.curve,
        "seconds": float(state.seconds),
    }
    store.save_tensors(path, payload)
    return state, True


def load_or_compute_importance(
    store: Store, config: ExperimentConfig, d1: D1State, tasks: list[Task]
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """(importance, seconds, computed now?) of ``config`` from the cache, else computed."""
    if config.importance == "none":
        return {}, 0.0, False
    path = store.importance / f"{importance_key(config)}.pt"
    saved = store.load_tensors(path)
    if saved is not None:
        return saved["importance"], float(saved["seconds"]), False
    importance, seconds = experiment.compute_importance(config, d1, tasks)
    payload = {
        "config": config.to_dict(),
        "importance": {k: v.detach().cpu() for k, v in importance.items()},
        "seconds": float(seconds),
    }
    store.save_tensors(path, payload)
    return importance, float(seconds), True


def run_group(job: GroupJob, on_done: Callable[[int], None] | None = None) -> GroupOutcome:
    """Run one group: D1 (cached), its importance passes (cached), its D2 runs in stacks.

    Runs already stored are skipped. Every finished run is written to the store as soon as
    its stack ends; a failure is recorded in DIR/errors for the runs it concerns (a failed
    D1 training or importance pass fails every run that needs it) and never raised.
    ``on_done(n)`` is called after each stack with the number of runs it stored.
    """
    start = time.perf_counter()
    outcome = GroupOutcome()
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    store = Store(job.root)
    todo = [c for c in job.configs if not store.has(run_id(c))]
    if not todo:
        return outcome

    def fail(configs: Iterable[ExperimentConfig], err: BaseException) -> None:
        for c in configs:
            rid = store.write_error(c, err)
            outcome.failed[rid] = f"{type(err).__name__}: {err}"

    try:
        tasks = tasks_for(todo[0], job.tasks_fn)
        d1, trained = load_or_train_d1(store, todo[0], tasks)
        outcome.d1_trained += int(trained)
    except Exception as err:  # recorded per run, reported at the end of the grid
        fail(todo, err)
        outcome.seconds = time.perf_counter() - start
        return outcome

    importances: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    runnable: list[ExperimentConfig] = []
    for config in todo:
        key = importance_key(config) if config.importance != "none" else "none"
        if key not in importances:
            try:
                imp, seconds, computed = load_or_compute_importance(store, config, d1, tasks)
            except Exception as err:
                fail([c for c in todo if c.importance != "none" and importance_key(c) == key], err)
                importances[key] = ({}, math.nan)
                continue
            outcome.importance_computed += int(computed)
            importances[key] = (imp, seconds)
        if not math.isnan(importances[key][1]):
            runnable.append(config)

    def imp_of(c: ExperimentConfig) -> tuple[dict[str, torch.Tensor], float]:
        return importances[importance_key(c) if c.importance != "none" else "none"]

    for chunk in chunks(runnable, max(1, job.stack)):
        try:
            if job.stack <= 1:
                results = [
                    experiment.retrain_d2(c, d1, imp_of(c)[0], tasks, imp_of(c)[1]) for c in chunk
                ]
            else:
                results = stacked.retrain_d2_stacked(
                    chunk, d1, [imp_of(c)[0] for c in chunk], tasks, [imp_of(c)[1] for c in chunk]
                )
        except Exception as err:
            fail(chunk, err)
            continue
        for result in results:
            rid = store.write_result(result)
            outcome.done.append(rid)
            if job.return_records:
                outcome.records[rid] = store.run_path(rid).read_text(encoding="utf-8")
        if on_done is not None:
            on_done(len(results))
    outcome.seconds = time.perf_counter() - start
    return outcome


# ----------------------------------------------------------------------------- executors


@dataclass
class Summary:
    """What :func:`execute` did: runs in the grid, already stored, finished now, failed."""

    total: int
    skipped: int
    done: int
    failed: dict[str, str]
    d1_trained: int
    importance_computed: int
    seconds: float


def cpu_count() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def execute(
    configs: Sequence[ExperimentConfig],
    root: str | os.PathLike[str],
    *,
    workers: int = 1,
    stack: int = 16,
    executor: str = "local",
    address: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    tasks_fn: TasksFn | None = None,
) -> Summary:
    """Run every configuration not yet stored in results dir ``root``; see the module doc.

    ``threads`` per worker defaults to ``cores // workers`` (at least 1); with Ray, each task
    asks for that many CPUs. Returns a :class:`Summary`; failures are in DIR/errors.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if stack < 1:
        raise ConfigError(f"--stack must be >= 1, got {stack}")
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    start = time.perf_counter()
    store = Store(root)
    stored = store.stored_ids()
    all_ids = {run_id(c) for c in configs}
    todo = [c for c in configs if run_id(c) not in stored]
    groups = plan(todo)
    if threads is None:
        threads = max(1, cpu_count() // workers) if executor == "local" else 1
    jobs = [
        GroupJob(str(root), g.configs, stack, threads, tasks_fn, return_records=executor == "ray")
        for g in groups
    ]
    summary = Summary(len(all_ids), len(all_ids & stored), 0, {}, 0, 0, 0.0)
    bar = _progress_bar(len(all_ids), len(all_ids & stored), progress)
    try:
        if executor == "ray":
            outcomes = _run_ray(jobs, store, address, threads, bar, all_ids)
        elif workers == 1:
            outcomes = _run_inline(jobs, threads, bar)
        else:
            outcomes = _run_pool(jobs, store, workers, threads, bar, all_ids)
    finally:
        bar.close()
    for _job, outcome in outcomes:
        summary.done += len(outcome.done)
        summary.failed.update(outcome.failed)
        summary.d1_trained += outcome.d1_trained
        summary.importance_computed += outcome.importance_computed
    summary.seconds = time.perf_counter() - start
    return summary


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="grid",
        unit="run",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.05,
    )


def _poll(bar: Any, store: Store, ids: set[str]) -> None:
    n = len(store.stored_ids() & ids)
    if n > bar.n:
        bar.update(n - bar.n)


def _run_inline(
    jobs: list[GroupJob], threads: int, bar: Any
) -> list[tuple[GroupJob, GroupOutcome]]:
    before = torch.get_num_threads()
    out = []
    try:
        for job in jobs:
            out.append((job, run_group(dataclasses.replace(job, threads=threads), bar.update)))
    finally:
        torch.set_num_threads(before)
    return out


def _failed_job(store: Store, job: GroupJob, err: BaseException) -> GroupOutcome:
    outcome = GroupOutcome()
    for c in job.configs:
        rid = run_id(c)
        if not store.has(rid):
            store.write_error(c, err)
            outcome.failed[rid] = f"{type(err).__name__}: {err}"
    return outcome


def _run_pool(
    jobs: list[GroupJob], store: Store, workers: int, threads: int, bar: Any, ids: set[str]
) -> list[tuple[GroupJob, GroupOutcome]]:
    context = multiprocessing.get_context("spawn")
    out: list[tuple[GroupJob, GroupOutcome]] = []
    with cf.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(run_group, job): job for job in jobs}
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=2.0, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    job = futures[fut]
                    try:
                        out.append((job, fut.result()))
                    except Exception as err:  # a worker died (e.g. killed): record, go on
                        out.append((job, _failed_job(store, job, err)))
                _poll(bar, store, ids)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return out


def _run_ray(
    jobs: list[GroupJob], store: Store, address: str | None, threads: int, bar: Any, ids: set[str]
) -> list[tuple[GroupJob, GroupOutcome]]:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is an optional extra
        raise ConfigError("--executor ray needs Ray: pip install 'masq-ewc[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        gpus = 1 if any(str(c.device).startswith("cuda") for j in jobs for c in j.configs) else 0
        remote = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=1)(run_group)
        refs = {remote.remote(job): job for job in jobs}
        pending = list(refs)
        out: list[tuple[GroupJob, GroupOutcome]] = []
        while pending:
            finished, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in finished:
                job = refs[ref]
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # a task failed outside run_group's own handling
                    out.append((job, _failed_job(store, job, err)))
                    continue
                for rid, text in outcome.records.items():
                    store.write_record_text(rid, text)
                by_id = {run_id(c): c for c in job.configs}
                for rid, message in outcome.failed.items():
                    if not (store.errors / f"{rid}.json").exists():
                        store.write_error(by_id[rid], message)
                outcome.records = {}
                out.append((job, outcome))
            _poll(bar, store, ids)
        return out
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- calibration


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
    measured: tuple[tuple[int, ...], ...]
    architectures: int


def task_sizes(slt: str, eval_val: bool) -> tuple[int, int]:
    """(D1 training samples, evaluated samples per evaluation) of an MNIST SLT, approximated
    from the class fractions: train 55,000, test 10,000 and validation 5,000 images."""
    spec = parse_spec(slt)
    n_tasks = len(spec.task_classes)
    frac1 = len(spec.task_classes[0]) / 10
    n_eval = 10_000 * (n_tasks if spec.permuted else 1)
    if eval_val:
        n_eval += 5_000 * (n_tasks if spec.permuted else 1)
    return int(55_000 * frac1), n_eval


def _timeit(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _per_iteration(run: Callable[[int], Any], short: int, long: int) -> float:
    """Seconds per iteration of ``run(iters)``: (t(long) − t(short)) / (long − short), so the
    fixed cost of a call (setup, the evaluation at 0 and the end) cancels out."""
    run(short)  # warm-up
    t0 = time.perf_counter()
    run(short)
    t1 = time.perf_counter()
    run(long)
    t2 = time.perf_counter()
    return max((t2 - t1) - (t1 - t0), 1e-9) / (long - short)


def measure(hidden: tuple[int, ...], stack: int, short: int = 2, long: int = 8) -> dict[str, float]:
    """Seconds per: D1 training iteration (B = 100, Adam), D2 iteration of a stack of
    ``stack`` runs with the EWC penalty (``stack=1``: one run, ``train_task``), evaluated sample
    (one model / a stack), and importance sample (batches of 1000, forward and backward),
    timed on random MNIST-shaped data (``long - short`` iterations)."""
    from masq import ewc, train
    from masq.models import mlp

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 784, generator=gen)
    y = torch.randint(0, 10, (2000,), generator=gen)
    model = mlp(hidden, seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    importance = {k: torch.rand_like(v) for k, v in state.items()}
    anchor = ewc.anchor(model, importance)

    def d1(iters: int) -> None:
        cfg = train.TrainConfig(lr=1e-3, iters=iters, batch_size=100, seed=0)
        train.train_task(model, (x, y), cfg)

    def one(iters: int) -> None:
        cfg = train.TrainConfig(lr=1e-5, iters=iters, batch_size=100, seed=0)
        train.train_task(model, (x, y), cfg, penalty=lambda m: ewc.penalty(m, anchor, 1000.0))

    def stacked_runs(iters: int) -> None:
        stacked.train_stacked(
            state,
            (x, y),
            lrs=[1e-5] * stack,
            lams=[1000.0] * stack,
            importances=[importance] * stack,
            iters=iters,
            batch_size=100,
            eval_every=iters,
            seed=0,
        )

    t_d1 = _per_iteration(d1, short, long)
    t_d2 = _per_iteration(one if stack <= 1 else stacked_runs, short, long)
    s = stacked.stack_state(state, max(1, stack))
    t_eval_stack = _timeit(lambda: stacked.stacked_correct(s, x, y), 2) / x.shape[0]
    t_eval_one = _timeit(lambda: train.eval_counts(model, {"x": (x, y)}), 2) / x.shape[0]
    xb, yb = x[:1000], y[:1000]

    def fwd_bwd() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()

    t_imp = _timeit(fwd_bwd, 2) / 1000
    return {
        "d1_iter": t_d1,
        "d2_iter": t_d2,
        "eval_sample_one": t_eval_one,
        "eval_sample_stack": t_eval_stack,
        "importance_sample": t_imp,
    }


def _n_params(hidden: Sequence[int]) -> int:
    widths = (784, *hidden, 10)
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def calibrate(
    archs: Sequence[tuple[int, ...]], stack: int, *, threads: int, max_measured: int = 3
) -> tuple[dict[tuple[int, ...], dict[str, float]], tuple[tuple[int, ...], ...]]:
    """Per architecture the costs of :func:`measure`, measured with ``threads`` torch threads
    for up to ``max_measured`` architectures (smallest, largest, middle by parameter count)
    and interpolated linearly in the parameter count for the others."""
    distinct = sorted(set(archs), key=_n_params)
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
        measured = {h: measure(h, stack) for h in picked}
    finally:
        torch.set_num_threads(before)
    xs = [_n_params(h) for h in picked]
    out: dict[tuple[int, ...], dict[str, float]] = {}
    for h in distinct:
        if h in measured:
            out[h] = measured[h]
            continue
        p = _n_params(h)
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


def estimate(
    groups: Sequence[Group], stack: int, *, workers: int, threads: int | None = None
) -> Estimate:
    """Time to run ``groups`` with ``workers`` workers of ``threads`` threads, extrapolated
    from :func:`calibrate` (assumes perfect parallel efficiency across workers)."""
    threads = max(1, cpu_count() // workers) if threads is None else threads
    archs = [c.hidden for g in groups for c in g.configs[:1]]
    if not archs:
        return Estimate(0.0, 0.0, 0.0, 0.0, 0.0, workers, threads, (), 0)
    costs, picked = calibrate(archs, stack, threads=threads)
    d1 = imp = d2 = ev = 0.0
    for g in groups:
        first = g.configs[0]
        c = costs[first.hidden]
        n_train, n_eval = task_sizes(first.slt, first.eval_val)
        evals1 = len(eval_iterations(first.iters1, first.eval_every))
        e1 = evals1 * n_eval * c["eval_sample_one"]
        d1 += first.iters1 * c["d1_iter"] + e1
        imp += len(g.importance_keys) * n_train * c["importance_sample"]
        for chunk in chunks(g.configs, stack):
            k = len(chunk)
            evals2 = len(eval_iterations(chunk[0].iters2, chunk[0].eval_every))
            scale = k / max(1, stack)  # a short stack costs about its share
            e2 = evals2 * n_eval * (c["eval_sample_stack"] if stack > 1 else c["eval_sample_one"])
            d2 += (chunk[0].iters2 * c["d2_iter"] + e2) * (scale if stack > 1 else k)
            ev += e2 * (scale if stack > 1 else k)
        ev += e1
    total = (d1 + imp + d2) / workers
    return Estimate(
        total,
        d1 / workers,
        imp / workers,
        d2 / workers,
        ev / workers,
        workers,
        threads,
        picked,
        len(set(archs)),
    )
