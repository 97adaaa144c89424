"""The registry of consolidation methods: how importances and anchors combine over tasks.

A :class:`Method` says everything about itself, and the protocol's one phase loop
(:mod:`masq.protocol.run`) asks it instead of knowing it. Phase t of a run is

    plan  = method.before_phase(config, state, model, t, ctx)   # the penalty of phase t (and
                                                                 # a wrapper of the network)
    train phase t with plan                                      # the measure's per-step hook
    imp   = measure(model after phase t)   if method.wants_importance(config, t)
    state = method.after_phase(config, state, model, imp, t)     # combine

and after the last phase ``method.end(config, state, ctx)`` (IMM merges there). State goes in
and comes out (as in optax): nothing is hidden on the model. A method also declares

- ``reads(config)``: the configuration fields of the later phases it reads (λ for EWC, λ and γ
  for online EWC, the transfer settings for IMM): the one statement of "which field matters
  for which method" (grid canonicalisation, CLI warnings and labels derive from it);
- ``label``: its name in tables ("EWC+FIM", "online EWC+MaSQ (sum)", "mode-IMM+FIM");
- ``canonical(config)``: the settings under which it is another run (λ = 0 is no EWC);
- ``stackable``: whether K runs of it can be trained at once by :mod:`masq.stacked`;
- ``shared_training(config)``: a key equal for runs whose phases train alike (IMM: the
  merge comes after training), so a grid trains them once.

Register your own with :func:`register_method`; an unknown name is a one-line ConfigError
listing the known ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from masq.config import FIELD, IMPORTANCE_FIELDS, RunConfig, Stage
from masq.consolidation.penalty import Penalty
from masq.errors import ConfigError
from masq.importance import Importance, Measure, get_measure
from masq.registry import REGISTRIES, Registry
from masq.tasks import XY, Task

# The fields of the later phases that every run uses (the rest belong to some method).
TRAINING_FIELDS: tuple[str, ...] = ("consolidation", "lr2", "iters2")
METHOD_FIELDS: tuple[str, ...] = tuple(
    f.name for f in FIELD.values() if f.stage == Stage.LATER and f.name not in TRAINING_FIELDS
)


@dataclass(frozen=True)
class PhasePlan:
    """What training of one phase adds: a penalty (value and gradient,
    :class:`~masq.consolidation.penalty.Penalty`) and a wrapper of the network that training
    (not evaluation) sees (IMM's drop-transfer).

    ``train`` replaces the phase's training data (None: its task's own), e.g. joint
    training's union of the tasks seen so far; ``train_tasks`` (int64 [N]) names each of its
    samples' task (0-based), whose output units the sample's loss uses in the task-incremental
    scenario (needed there, ignored in the others)."""

    penalty: Penalty | None = None
    wrap: Callable[[nn.Module], nn.Module] | None = None
    train: XY | None = None
    train_tasks: Tensor | None = None


class PhaseContext(Protocol):
    """What the protocol offers a method: the run's device, its tasks (in the run's
    scenario), the seeds of its random streams (:func:`masq.streams.stream_seed`), and
    evaluation of a parameter set on every task's test and validation set and their unions."""

    device: torch.device

    @property
    def tasks(self) -> Sequence[Task]: ...

    def seed(self, stream: str) -> int:
        """The seed of the run's random stream named ``stream``."""
        ...

    def evaluate(self, params: Mapping[str, Tensor]) -> dict[str, float]:
        """Test (and validation) accuracy of ``params`` on every task and on their unions."""
        ...


@dataclass
class EndResult:
    """What a method's end hook adds to the record: ``metrics`` (scalars), ``record`` (stored
    under the method's ``record_key``, e.g. IMM's α sweep) and the ``seconds`` it took."""

    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Method:
    """Base of a consolidation method (module docstring). Subclasses set ``name`` and
    override what they need; the defaults are "no consolidation"."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # a name for messages: "EWC", "online EWC", "IMM"
    fields: ClassVar[tuple[str, ...]] = ()  # every method field it may read
    stackable: ClassVar[bool] = False
    record_key: ClassVar[str] = ""  # where end() results go in the record ("imm")
    description: ClassVar[str] = ""

    def __eq__(self, other: object) -> bool:
        """Methods are equal when they are of one class (each holds no state of its own)."""
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def reads(self, config: RunConfig) -> tuple[str, ...]:
        """The fields of :data:`METHOD_FIELDS` this method reads for ``config`` (a subset of
        ``fields``, e.g. IMM's ``drop_p`` only with drop-transfer)."""
        return self.fields

    def label(self, values: Mapping[str, Any], measure: Measure, detailed: bool) -> str:
        """The method's name for a run with config ``values`` and measure ``measure``."""
        return self.name

    def canonical(self, config: RunConfig) -> dict[str, Any]:
        """Changes that make ``config`` the run it is equivalent to ({} if none)."""
        return {}

    def check(self, config: RunConfig, measure: Measure) -> None:
        """A one-line ConfigError if ``config`` cannot run with this method."""

    def wants_importance(self, config: RunConfig, phase: int) -> bool:
        """Whether the importance of the task of phase ``phase`` (0-based) is computed."""
        return False

    def init(self, config: RunConfig) -> Any:
        """The state before phase 1."""
        return None

    def before_phase(
        self, config: RunConfig, state: Any, model: nn.Module, phase: int, ctx: PhaseContext
    ) -> PhasePlan:
        """The penalty (and wrapper) of phase ``phase`` >= 1."""
        return PhasePlan()

    def after_phase(
        self,
        config: RunConfig,
        state: Any,
        model: nn.Module,
        importance: Importance | None,
        phase: int,
    ) -> Any:
        """The state after phase ``phase``, from the trained ``model`` and the task's
        ``importance`` (None where none was computed)."""
        return state

    def end(self, config: RunConfig, state: Any, ctx: PhaseContext) -> EndResult | None:
        """Work after the last phase (merging); None for none."""
        return None

    def shared_training(self, config: RunConfig) -> tuple[Any, ...] | None:
        """A key shared by runs whose phases train alike (None: training is the run's own)."""
        return None


METHODS: Registry[Method] = Registry(
    "consolidation", "consolidation method", "masq.consolidation.register_method"
)
REGISTRIES["method"] = METHODS  # so that RunConfig.validate refuses unknown names


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` under its name; a ConfigError if the name is taken
    (unless ``replace``). Returns it."""
    if not isinstance(method, Method) or not method.name:
        raise ConfigError(
            f"register_method: give a named masq.consolidation.Method, got {method!r}"
        )
    return METHODS.register(method.name, method, replace=replace)


def get_method(name: object) -> Method:
    """The method registered as ``name``; else a one-line ConfigError listing the known ones."""
    return METHODS.lookup(name)


def method_names() -> tuple[str, ...]:
    """The registered methods' names, sorted."""
    return METHODS.names()


def check_config(config: RunConfig) -> RunConfig:
    """``config`` validated (:meth:`RunConfig.validate`), its measure and method registered,
    and the method able to run it; a one-line ConfigError otherwise. Returns it."""
    config.validate()
    measure = get_measure(config.importance)
    get_method(config.consolidation).check(config, measure)
    return config


def values_of(config: Any) -> dict[str, Any]:
    """A config's values as a plain dict (a RunConfig or a mapping such as a record's row)."""
    if hasattr(config, "to_dict"):
        values: dict[str, Any] = config.to_dict()
        return values
    return {k: getattr(v, "value", v) for k, v in dict(config).items()}


def method_label(values: Any, *, detailed: bool = False) -> str:
    """A short human name of a run's consolidation, from a RunConfig or a mapping with its
    fields: "no EWC" (λ = 0 or no importance), "EWC+FIM", "EWC+FIM (sample)", "EWC+MaSQ
    (mean)", "online EWC+MaSQ (sum)", "MAS", "L2", "mode-IMM+FIM, drop p=0.5"; ``detailed``
    adds B_MaSQ: "EWC+MaSQ (mean, B=1000)". Asked of the method and the measure."""
    d = values_of(values)
    method = get_method(d.get("consolidation", "ewc"))
    return method.label(d, get_measure(d.get("importance", "masq")), detailed)


def canonical(config: RunConfig) -> RunConfig:
    """``config`` with every field that cannot affect its result at its default: first the
    method's own rules (:meth:`Method.canonical`: λ = 0 is no EWC, ...), then every importance
    field its measure does not read and every method field its method does not read
    (:meth:`Method.reads`, :meth:`Measure.reads`). Equivalent runs get one run id."""
    config = dataclasses.replace(config, **get_method(config.consolidation).canonical(config))
    method, measure = get_method(config.consolidation), get_measure(config.importance)
    keep = {"importance", *measure.reads(config), *method.reads(config)}
    changes = {
        name: FIELD[name].default
        for name in (*IMPORTANCE_FIELDS, *METHOD_FIELDS)
        if name not in keep
    }
    return dataclasses.replace(config, **changes)


__all__ = [
    "METHODS",
    "METHOD_FIELDS",
    "TRAINING_FIELDS",
    "EndResult",
    "Method",
    "PhaseContext",
    "PhasePlan",
    "canonical",
    "check_config",
    "get_method",
    "method_label",
    "method_names",
    "register_method",
    "values_of",
]
