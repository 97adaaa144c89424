"""The two-task EWC protocol of PAPER.md section 3 -> a :class:`Result` record.

CONTRACT STUB written by the lead: the dataclass fields and function signatures
below are what ``masq.search`` (the grid) builds on. Keep them (add fields with
defaults if needed, and tell the lead); fill in the bodies.

Stages, so a grid can share work (PAPER.md section 3):

    tasks   = make_tasks(config)                         # SLT from the dataset
    d1      = train_d1(config, tasks)                    # step 1: train on D1 (lambda = 0)
    imp     = compute_importance(config, d1, tasks)      # steps 2-3: anchor + importance pass
    result  = retrain_d2(config, d1, imp, tasks)         # steps 4-5: re-train on D2 with EWC
    run(config) == retrain_d2(config, d1, imp, tasks)    # all four in one call
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from masq.tasks import Task

# The fields of ExperimentConfig that determine the D1 state (its training), and
# those that in addition determine the importance. Everything else only affects D2.
D1_FIELDS: tuple[str, ...] = (
    "slt",
    "dataset",
    "hidden",
    "init",
    "lr1",
    "iters1",
    "batch_size",
    "seed",
    "eval_every",
    "eval_val",
)
IMPORTANCE_FIELDS: tuple[str, ...] = ("importance", "masq_batch", "scale", "fisher_labels")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one two-task run. ``importance`` in {"fisher", "masq", "none"}."""

    slt: str = "D5-5"
    dataset: str = "mnist"
    hidden: tuple[int, ...] = (800, 800)
    init: str = "torch"  # "torch" | "tf"
    lr1: float = 1e-3
    lr2: float = 1e-5
    lam: float = 1000.0
    importance: str = "masq"  # "fisher" | "masq" | "none"
    masq_batch: int = 1000
    scale: str = "mean"  # "mean" | "sum" (masq only)
    fisher_labels: str = "true"  # "true" | "sampled" | "exact" (fisher only)
    iters1: int = 5000
    iters2: int = 5000
    batch_size: int = 100
    eval_every: int = 50
    eval_val: bool = False  # also evaluate on the validation sets (for --select-on val)
    seed: int = 0
    device: str = "cpu"  # "cpu" | "cuda" | "auto"; not part of the run id

    def validate(self) -> ExperimentConfig:
        """Raise ConfigError (one line, naming the field and the fix) for any bad value."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Inverse of to_dict; unknown keys are a ConfigError."""
        raise NotImplementedError


# A curve: {"iteration": [...], "<set name>": [accuracy, ...], ...}; set names are
# "D1", "D2", "D1∪D2" (test sets) and, with eval_val, "val:D1", "val:D2", "val:D1∪D2".
Curve = dict[str, list[float]]


@dataclass
class D1State:
    """The state after training on D1: what every D2 run of a grid starts from."""

    config: ExperimentConfig
    state_dict: dict[str, Tensor]
    curve: Curve
    seconds: float


@dataclass
class Result:
    """One run's record. ``best``/``last`` hold {"D1∪D2", "D1", "D2", "iteration"} (and the
    "val:" sets with eval_val) at the point of the highest / the final D1∪D2 accuracy during
    re-training. ``importance_summary`` is {tensor name: {"max", "mean"}}; ``timings`` is
    {"d1_train", "importance", "d2_train"} in seconds."""

    config: ExperimentConfig
    curve_d1: Curve
    curve_d2: Curve
    best: dict[str, float]
    last: dict[str, float]
    importance_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_json(cls, text: str) -> Result:
        raise NotImplementedError


def make_tasks(config: ExperimentConfig) -> list[Task]:
    raise NotImplementedError


def train_d1(config: ExperimentConfig, tasks: list[Task]) -> D1State:
    raise NotImplementedError


def compute_importance(
    config: ExperimentConfig, d1: D1State, tasks: list[Task]
) -> tuple[dict[str, Tensor], float]:
    """(importance, seconds) on D1's training data from the D1 state; {} for "none"."""
    raise NotImplementedError


def retrain_d2(
    config: ExperimentConfig,
    d1: D1State,
    importance: dict[str, Tensor],
    tasks: list[Task],
    importance_seconds: float = 0.0,
) -> Result:
    raise NotImplementedError


def best_and_last(curve: Curve, key: str = "D1∪D2") -> tuple[dict[str, float], dict[str, float]]:
    """The "best" and "last" points of a re-training curve by ``key``."""
    raise NotImplementedError


def run(config: ExperimentConfig) -> Result:
    raise NotImplementedError
