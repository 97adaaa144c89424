"""One source of truth for configuration: the config fields (:class:`RunConfig`, their
metadata in :data:`FIELDS`) and the choices (``str`` Enums, defined in :mod:`masq.choices` and
re-exported here: every module that takes a choice imports its Enum from here).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

from masq.architecture import (
    HIDDEN_HELP,
    MAX_PARAMS,
    check_model_size,
    hidden_text,
    mlp_widths,
    n_params,
    parse_hidden,
)
from masq.choices import (
    DEVICE_HELP,
    LEGACY_ID_VALUES,
    AdamState,
    Choice,
    ClassOrder,
    ClassUnits,
    Criterion,
    EvalSchedule,
    Executor,
    FisherLabels,
    Init,
    Precision,
    Scale,
    Scenario,
    SelectOn,
    SIGradient,
    Transfer,
    check_device_name,
    choice,
)
from masq.errors import ConfigError
from masq.registry import REGISTRIES

# ----------------------------------------------------------------------------- the registry


class Stage(Choice):
    """Which part of a run a field determines (and so which work runs can share)."""

    DATA = "data"  # the tasks: SLT, dataset, seed
    FIRST = "first"  # training on task 1 (the "D1 state" a grid shares)
    IMPORTANCE = "importance"  # the importance pass on a trained task
    LATER = "later"  # training on tasks 2..T with the consolidation of the earlier ones
    RUN = "run"  # where it runs; not part of the run id


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One configuration field: its name, element type, default, stage and help (read off
    :class:`RunConfig`'s fields and their metadata: :data:`FIELDS`).

    ``since_v1`` fields were added after the first store format: they are left out of the run
    id while at their default, so the ids of runs stored before them stay what they were.
    ``registry`` names the registry whose entries the value names ("measure": the importance
    measures of :mod:`masq.importance`, "method": the consolidation methods of
    :mod:`masq.consolidation`); those layers check the name, this one only its type.
    """

    name: str
    kind: type
    default: Any
    stage: Stage
    help: str
    check: str = ""  # "positive", "nonneg", "unit" (0 <= x <= 1) or "" (type only)
    since_v1: bool = False
    registry: str = ""

    @property
    def flag(self) -> str:
        """The command-line flag: ``--lr2``, ``--masq-batch``, ..."""
        return "--" + self.name.replace("_", "-")


def check_registered(spec: FieldSpec, value: Any, where: str = "") -> None:
    """A one-line ConfigError unless ``value`` names an entry of ``spec``'s registry (no check
    when the field names none, or its package has not been loaded)."""
    registry = REGISTRIES.get(spec.registry) if spec.registry else None
    if registry is not None:
        registry.lookup(value, where)


def _field(
    default: Any,
    stage: Stage,
    help: str,
    *,
    check: str = "",
    since_v1: bool = False,
    registry: str = "",
) -> Any:
    """A :class:`RunConfig` field with its metadata (stage, help, check, since_v1, registry)."""
    meta = {"stage": stage, "help": help, "check": check, "since_v1": since_v1,
            "registry": registry}  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


D, F, IMP, L, R = Stage.DATA, Stage.FIRST, Stage.IMPORTANCE, Stage.LATER, Stage.RUN
Hidden: type[tuple[int, ...]] = tuple  # the element type of ``hidden``: a tuple of positive ints


# Adding a configuration field is one line here and its axis in masq.grid.Grid: it then reaches
# its validation, the CLI flags of `masq run` and `masq grid`, the grid's TOML keys, the run id,
# the shared-work keys of its stage and the report's columns (tests/test_config.py checks).
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run: T tasks of an SLT in a scenario, task 1 at lr1 for
    iters1, every later task at lr2 for iters2 with the consolidation of the tasks before it.
    Each field carries its stage, help and range check as metadata (:data:`FIELDS`)."""

    slt: str = _field("D5-5", D, "sequential learning task, e.g. D5-5, D9-1, DP10-10, D2-2-2-2-2")
    dataset: str = _field("mnist", D, "dataset name (mnist, fashion-mnist)")
    scenario: Scenario = _field(
        Scenario.CLASS,
        D,
        "class (one shared head, no task identity) | task (task identity given: the other "
        "tasks' output units masked) | domain (every task onto one shared label set) | "
        "class-blocks (every task's classes new ones: permuted MNIST on T·10 units)",
        since_v1=True,
    )
    seed: int = _field(0, D, "seed of every random stream of the run", check="nonneg")
    class_order: ClassOrder = _field(
        ClassOrder.FIXED,
        D,
        "fixed (the SLT's classes in its order) | seeded (a class split's classes permuted by "
        "the seed: a new class-to-task assignment per seed, as van de Ven's split MNIST)",
        since_v1=True,
    )
    pad: int = _field(0, D, "zero pixels added on every side of each image before any "
                      "permutation (2: the 32×32 inputs of van de Ven & Tolias's code)",
                      check="nonneg", since_v1=True)  # fmt: skip
    permute_first: bool = _field(
        False,
        D,
        "permuted SLTs: give task 1 its own seeded permutation too (van de Ven & Tolias's seeds "
        "other than 0); tasks 2..T keep theirs",
        since_v1=True,
    )
    train_on_val: bool = _field(
        False,
        D,
        "train on the validation images too (all of MNIST's 60,000 training images, as van de "
        "Ven & Tolias's code); validation curves then measure images trained on, and no table "
        "selects λ or a point on them",
        since_v1=True,
    )
    hidden: tuple[int, ...] = _field((800, 800), F, "hidden layer sizes, e.g. 800-400-400")
    init: Init = _field(Init.TORCH, F, "initialization: torch | tf")
    lr1: float = _field(1e-3, F, "Adam learning rate on task 1 (ε1)", check="positive")
    iters1: int = _field(5000, F, "iterations on task 1", check="positive")
    batch_size: int = _field(100, F, "mini-batch size B of every phase", check="positive")
    adam_state: AdamState = _field(
        AdamState.RESET,
        F,
        "reset (a fresh Adam for every task: the paper) | keep (one Adam across all tasks, its "
        "moments and step count carried on, the learning rate set per phase: van de Ven's code)",
        since_v1=True,
    )
    class_units: ClassUnits = _field(
        ClassUnits.ALL,
        F,
        "class-incremental scenarios (class, class-blocks): all (every output unit active from "
        "task 1 on) | seen (in phase t only the units of the classes of tasks 1..t, in training, "
        "the importance pass and evaluation: van de Ven & Tolias's code)",
        since_v1=True,
    )
    eval_every: int = _field(
        250, F, "evaluate every N iterations (and at 0 and the end)", check="positive"
    )
    eval_val: bool = _field(False, F, "also evaluate on the validation sets (--select-on val)")
    eval_schedule: EvalSchedule = _field(
        EvalSchedule.EVERY,
        F,
        "when to evaluate: every (every --eval-every iterations) | paper | dense-early",
        since_v1=True,
    )
    precision: Precision = _field(
        Precision.FP32,
        F,
        "fp32 | bf16 (bfloat16 matmuls, float32 weights and optimizer)",
        since_v1=True,
    )
    importance: str = _field(
        "masq",
        IMP,
        "importance measure (masq.importance.MEASURES): fisher | masq | mas | l2 | "
        "none, or one registered by your code",
        registry="measure",
    )
    masq_batch: int = _field(
        1000, IMP, "batch size of the importance pass (MaSQ's B_MaSQ)", check="positive"
    )
    scale: Scale = _field(Scale.MEAN, IMP, "MaSQ scale: mean (the paper) | sum")
    fisher_labels: FisherLabels = _field(
        FisherLabels.EMPIRICAL,
        IMP,
        "Fisher labels: empirical (the true labels: the paper) | sample | exact | predicted | "
        "batched (squared batch-mean gradients at B = --masq-batch); masq 0.1's true = "
        "empirical, sampled = sample",
    )
    fisher_samples: int = _field(
        0,
        IMP,
        "Fisher on a seeded random subset of N training samples of the task (0: all of them)",
        check="nonneg",
        since_v1=True,
    )
    si_damping: float = _field(
        0.1,
        IMP,
        "SI damping ξ: Ω_k = ω_k / ((Δθ_k)² + ξ) (Zenke et al. 2017)",
        check="positive",
        since_v1=True,
    )
    si_gradient: SIGradient = _field(
        SIGradient.TASK,
        IMP,
        "SI's gradient g in ω = Σ −g·Δθ: task (the task loss alone: Zenke et al.) | total "
        "(task loss + penalty, the gradient of the step: van de Ven's code)",
        since_v1=True,
    )
    consolidation: str = _field(
        "ewc",
        L,
        "consolidation method (masq.consolidation.METHODS): ewc (one anchor per earlier task) | "
        "online-ewc (running importance) | mean-imm | mode-imm (train on, then merge: Lee et "
        "al. 2017) | joint (every task seen so far trained together: the upper bound)",
        since_v1=True,
        registry="method",
    )
    gamma: float = _field(1.0, L, "online EWC decay γ: F <- γF + F_t", check="unit", since_v1=True)
    transfer: Transfer = _field(
        Transfer.WEIGHT,
        L,
        "IMM: weight | l2 | drop | l2-drop (transfer from the previous solution)",
        since_v1=True,
    )
    transfer_lam: float = _field(
        1e-3, L, "IMM L2-transfer weight: λ Σ (θ − θ_prev)²", check="nonneg", since_v1=True
    )
    drop_p: float = _field(
        0.5,
        L,
        "IMM drop-transfer rate p (dropout of θ − θ_prev), < 1",
        check="unit",
        since_v1=True,
    )
    alpha_step: float = _field(
        0.01,
        L,
        "IMM: step of the swept merge weight α of the last task",
        check="positive",
        since_v1=True,
    )
    lr2: float = _field(1e-5, L, "Adam learning rate on tasks 2..T (ε2)", check="positive")
    lam: float = _field(1000.0, L, "consolidation weight λ", check="nonneg")
    iters2: int = _field(5000, L, "iterations on each of tasks 2..T", check="positive")
    device: str = _field("cpu", R, "cpu | cuda | cuda:N | auto")

    def __post_init__(self) -> None:
        for spec in FIELDS:  # Enum members and floats whatever was passed in
            value = getattr(self, spec.name)
            try:
                value = coerce(spec, value)
            except ConfigError:
                continue  # reported by validate()
            object.__setattr__(self, spec.name, value)

    def validate(self) -> RunConfig:
        """Coerce and check every field; the SLT must parse and have at least two tasks.
        Raises a one-line ConfigError naming the field and the fix; returns the config.
        The names of measures and methods are checked against their registries
        (:data:`REGISTRIES`); :func:`masq.consolidation.check_config` also asks the method."""
        from masq.slt import parse_spec

        for spec in FIELDS:
            value = coerce(spec, getattr(self, spec.name))
            if spec.kind in (int, float):
                check_value(spec, value)
            check_registered(spec, value)
        parsed = parse_spec(self.slt)
        if len(parsed.task_classes) < 2:
            raise ConfigError(
                f"slt: a continual-learning run needs at least two tasks, got {self.slt!r}"
            )
        if self.permute_first and not parsed.permuted:
            raise ConfigError(
                f"permute_first: {self.slt!r} is a class split without permutations; use it "
                "with a permuted SLT (e.g. DP10-10), or leave it off"
            )
        check_device_name(self.device)
        check_model_size(self.hidden, in_features=self.in_features)
        if self.class_units == ClassUnits.SEEN and self.scenario not in (
            Scenario.CLASS,
            Scenario.CLASS_BLOCKS,
        ):
            raise ConfigError(
                f"class_units: seen applies to the class-incremental scenarios (class, "
                f"class-blocks), not {self.scenario}; use --class-units all"
            )
        if self.drop_p >= 1:
            raise ConfigError(f"drop_p: must be < 1, got {self.drop_p!r}")
        return self

    @property
    def n_tasks(self) -> int:
        """T, the number of tasks of the SLT."""
        from masq.slt import parse_spec

        return len(parse_spec(self.slt).task_classes)

    @property
    def in_features(self) -> int:
        """The network's input width, (28 + 2·pad)² pixels (every dataset's images are 28×28)."""
        return (28 + 2 * int(self.pad)) ** 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: Enum members as their values, tuples as lists."""
        out: dict[str, Any] = {}
        for spec in FIELDS:
            value = getattr(self, spec.name)
            if isinstance(value, Choice):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[spec.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults; unknown keys and
        values of the wrong type are a ConfigError."""
        unknown = sorted(set(d) - set(FIELD))
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown}; known keys: {sorted(FIELD)}")
        return cls(**{k: coerce(FIELD[k], v) for k, v in d.items()})

    def with_(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (values coerced to the fields' types)."""
        unknown = sorted(set(changes) - set(FIELD))
        if unknown:
            raise ConfigError(f"config: unknown fields {unknown}; known: {sorted(FIELD)}")
        coerced = {k: coerce(FIELD[k], v) for k, v in changes.items()}
        return dataclasses.replace(self, **coerced)


del D, F, IMP, L, R


def _spec_of(field: dataclasses.Field[Any], hint: Any) -> FieldSpec:
    kind = typing.get_origin(hint) or hint
    return FieldSpec(field.name, kind, field.default, **field.metadata)


FIELDS: tuple[FieldSpec, ...] = tuple(
    _spec_of(f, typing.get_type_hints(RunConfig)[f.name]) for f in dataclasses.fields(RunConfig)
)
FIELD: dict[str, FieldSpec] = {f.name: f for f in FIELDS}


def fields_of(*stages: Stage) -> tuple[str, ...]:
    """The names of the fields of ``stages``, in registry order."""
    return tuple(f.name for f in FIELDS if f.stage in stages)


# The fields that determine the state after task 1 (what a grid's runs share), those that in
# addition determine task 1's importance, and those of the run id (all but RUN).
DATA_FIELDS: tuple[str, ...] = fields_of(Stage.DATA)  # what the tasks are built from
FIRST_FIELDS: tuple[str, ...] = fields_of(Stage.DATA, Stage.FIRST)
IMPORTANCE_FIELDS: tuple[str, ...] = fields_of(Stage.IMPORTANCE)
ID_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.stage != Stage.RUN)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def coerce(spec: FieldSpec, value: Any, where: str = "") -> Any:
    """``value`` as ``spec``'s type (Enum members from strings, floats from ints, hidden sizes
    from "800-400" or a list); a wrong type is a one-line ConfigError."""
    name = f"{where}{spec.name}"
    if spec.kind is Hidden:
        return parse_hidden(value, name)
    if isinstance(spec.kind, type) and issubclass(spec.kind, Choice):
        return choice(spec.kind, value, name)
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if spec.kind is float:
        if not _is_real(value):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        return float(value)
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: must be a non-empty string, got {value!r}")
    return value


def check_value(spec: FieldSpec, value: Any, where: str = "") -> None:
    """ConfigError (one line) unless ``value`` passes ``spec.check``."""
    name = f"{where}{spec.name}"
    if spec.kind is float and not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    if spec.check == "positive" and not value > 0:
        raise ConfigError(f"{name}: must be > 0, got {value!r}")
    if spec.check == "nonneg" and not value >= 0:
        raise ConfigError(f"{name}: must be >= 0, got {value!r}")
    if spec.check == "unit" and not 0 <= value <= 1:
        raise ConfigError(f"{name}: must be between 0 and 1, got {value!r}")


# ----------------------------------------------------------------------------- one definition each

LAM_DIGITS = 12  # λ = c / ε2 is rounded to this many significant digits (0.1 / 1e-3 -> 100.0)


def round_sig(x: float, digits: int = LAM_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (so 1 / 1e-5 gives exactly 100000.0)."""
    return float(f"{x:.{digits}g}")


def lam_per_lr2(c: float, lr2: float) -> float:
    """The λ of the reading "λ = c / ε2" (the paper's setting), rounded by :func:`round_sig`."""
    return round_sig(c / lr2)


__all__ = [
    "DATA_FIELDS",
    "DEVICE_HELP",
    "FIELD",
    "FIELDS",
    "FIRST_FIELDS",
    "HIDDEN_HELP",
    "ID_FIELDS",
    "IMPORTANCE_FIELDS",
    "LAM_DIGITS",
    "LEGACY_ID_VALUES",
    "MAX_PARAMS",
    "AdamState",
    "Choice",
    "ClassOrder",
    "ClassUnits",
    "Criterion",
    "EvalSchedule",
    "Executor",
    "FieldSpec",
    "FisherLabels",
    "Init",
    "Precision",
    "RunConfig",
    "SIGradient",
    "Scale",
    "Scenario",
    "SelectOn",
    "Stage",
    "Transfer",
    "check_device_name",
    "check_model_size",
    "check_registered",
    "check_value",
    "choice",
    "coerce",
    "fields_of",
    "hidden_text",
    "lam_per_lr2",
    "mlp_widths",
    "n_params",
    "parse_hidden",
    "round_sig",
]
