"""The registry of importance measures: one :class:`Measure` per name, filled by the modules
that define them (:mod:`masq.importance.measures`, :mod:`masq.importance.l2`,
:mod:`masq.importance.mas`) and by your own code.

A measure says everything about itself, and the rest of masq asks it instead of knowing it:

- ``name``: the value of ``RunConfig.importance`` (``--importance NAME``);
- ``fields``: the configuration fields it reads (``("fisher_labels",)`` for the FIM). This is
  the one statement of "which field matters for which measure": run ids of equivalent runs,
  grid grouping, the CLI's warnings about unused flags and the report's columns derive from it;
- ``label``: its name in tables and figures ("FIM", "MaSQ (mean)");
- when it is computed: ``compute(model, data, ctx) -> Importance`` after a phase, from the
  task's training data (FIM, MaSQ, MAS, L2), or ``tracker(model, ctx) -> StepTracker``
  accumulated during training through a per-step hook that the phase loop calls (SI-like
  measures); a measure with neither is "no importance" (``none``: plain fine-tuning).

Register your own::

    from masq.importance import Measure, register_measure

    def grad_abs(model, data, ctx):       # (1/K) Σ_b |∇ mean-batch loss|
        ...
        return {name: tensor shaped like the parameter}

    register_measure(Measure("grad-abs", label="|grad|", compute=grad_abs))
    # then RunConfig(importance="grad-abs"), masq.protocol.run(...), masq.grid.execute(...)

An unknown name is a one-line :class:`~masq.errors.ConfigError` listing the known ones; no
branch anywhere falls through to a default measure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from masq.errors import ConfigError
from masq.importance.persample import Importance
from masq.registry import REGISTRIES, Registry
from masq.tasks import XY


@dataclass(frozen=True)
class MeasureContext:
    """What the protocol hands a measure for one task's pass.

    ``settings`` holds the values of the measure's declared ``fields``; ``batch_size`` is the
    pass's mini-batch size (``RunConfig.masq_batch``); ``generator`` is seeded per run and task
    (the "fisher-labels" streams of :mod:`masq.streams`) and lives on ``device``; ``outputs``
    are the task's active output units in the task-incremental scenario (None: all units).
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 1000
    generator: torch.Generator | None = None
    device: torch.device | None = None
    outputs: tuple[int, ...] | None = None


class StepTracker(Protocol):
    """A measure accumulated during training: ``step(model)`` is called after every optimizer
    step of the phase (``.grad`` still holds the gradient that step used), ``importance()``
    once at the end of the phase.

    A tracker may also define ``observe_grad(model)``: the loop then calls it right after the
    backward pass of the task loss alone, before a penalty's gradient is added to ``.grad``
    (``train_task(grad_hook=...)``), so it can keep the task's own gradient of the step (SI,
    :mod:`masq.importance.si`). Without it a tracker sees only ``.grad`` after the step."""

    def step(self, model: nn.Module) -> None:
        """Accumulate after an optimizer step of ``model``."""
        ...

    def importance(self) -> Importance:
        """The importance accumulated over the phase, keyed like the parameters."""
        ...


Compute = Callable[[nn.Module, XY, MeasureContext], Importance]
Tracker = Callable[[nn.Module, MeasureContext], StepTracker]
Label = Callable[[Mapping[str, Any], bool], str]


@dataclass(frozen=True)
class Measure:
    """One importance measure (module docstring). ``label`` is a string or a function
    ``(config values, detailed) -> str``; ``standalone`` measures name the method themselves
    ("MAS", "L2" rather than "EWC+MAS"); ``reads_data`` is False for a measure computed
    without a pass over the task's data (then the pass's batch size does not matter).

    ``kind`` says what the importance is and so which penalty uses it: "diagonal" (the
    default) is one tensor F shaped like each parameter and the penalty
    (λ/2) Σ_k F_k (θ_k − θ*_k)²; a structured measure (K-FAC's Kronecker factors, per-layer
    Fisher blocks) names the kind its consolidation penalty is registered under
    (:data:`masq.consolidation.PENALTY_KINDS`), and its importance holds that penalty's
    factors by name.

    ``online``: the measure's published method keeps one running importance and the latest
    anchor (SI: online EWC with γ = 1); labels then say when a run differs from it.

    ``more_fields(config)``: importance fields the measure reads only in some settings (the
    Fisher's ``batched`` labels make the pass's batch size its b); :meth:`reads` adds them.

    ``layout``: the version of the layout of the importance it returns (which tensors, their
    shapes). It is part of the key of the grid's on-disk importance cache, so raising it when
    the layout changes makes a grid recompute what an older masq cached (run ids do not
    change: the numbers a run reports do not depend on how its importance was stored)."""

    name: str
    label: str | Label
    compute: Compute | None = None
    tracker: Tracker | None = None
    fields: tuple[str, ...] = ()
    standalone: bool = False
    reads_data: bool = True  # False: computed without a pass (L2); masq_batch then unused
    description: str = ""
    kind: str = "diagonal"  # the penalty its importance feeds (masq.consolidation.PENALTY_KINDS)
    more_fields: Callable[[Any], tuple[str, ...]] | None = None  # fields read in some settings
    online: bool = False  # its own method sums over tasks with the latest anchor (SI)
    layout: int = 1  # version of the stored importance's layout (the cache key holds it)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"measure: the name must be a non-empty string, got {self.name!r}")
        if self.compute is not None and self.tracker is not None:
            raise ConfigError(
                f"measure {self.name!r}: give compute (after a phase) or tracker (during "
                "training), not both"
            )

    @property
    def timing(self) -> str:
        """ "after" (computed after a phase from data), "during" (accumulated by a per-step
        hook while training) or "none" (no importance)."""
        if self.compute is not None:
            return "after"
        return "during" if self.tracker is not None else "none"

    @property
    def gives_importance(self) -> bool:
        """Whether the measure yields an importance at all (``none`` does not)."""
        return self.timing != "none"

    def text(self, values: Mapping[str, Any], detailed: bool = False) -> str:
        """The measure's label for a run with config ``values``."""
        return self.label if isinstance(self.label, str) else self.label(values, detailed)

    @property
    def uses(self) -> tuple[str, ...]:
        """Every importance field a run with this measure depends on: its ``fields`` and,
        for a pass over data, the pass's batch size ``masq_batch``."""
        extra = ("masq_batch",) if self.compute is not None and self.reads_data else ()
        return tuple(dict.fromkeys((*self.fields, *extra)))

    def reads(self, config: Any) -> tuple[str, ...]:
        """The importance fields whose values change this measure's result for ``config``:
        its ``fields`` and, where ``more_fields`` says so, more (the Fisher with batched
        labels reads the pass's batch size, which is its b). Run ids keep exactly these."""
        extra = self.more_fields(config) if self.more_fields is not None else ()
        return tuple(dict.fromkeys((*self.fields, *extra)))

    def settings(self, config: Any) -> dict[str, Any]:
        """{field: value} of the measure's ``fields`` in ``config`` (a RunConfig)."""
        return {name: getattr(config, name) for name in self.fields}


MEASURES: Registry[Measure] = Registry(
    "importance", "importance measure", "masq.importance.register_measure"
)
REGISTRIES["measure"] = MEASURES  # so that RunConfig.validate refuses unknown names


def register_measure(measure: Measure, *, replace: bool = False) -> Measure:
    """Add ``measure`` to :data:`MEASURES` under its name (a ConfigError if the name is taken,
    unless ``replace``); returns it."""
    if not isinstance(measure, Measure):
        raise ConfigError(f"register_measure: give a masq.importance.Measure, got {measure!r}")
    return MEASURES.register(measure.name, measure, replace=replace)


def get_measure(name: object) -> Measure:
    """The measure registered as ``name``; else a one-line ConfigError listing the known ones."""
    return MEASURES.lookup(name)


def measure_names() -> tuple[str, ...]:
    """The registered measures' names, sorted."""
    return MEASURES.names()


__all__ = [
    "MEASURES",
    "Importance",
    "Measure",
    "MeasureContext",
    "StepTracker",
    "get_measure",
    "measure_names",
    "register_measure",
]
