"""The choices of masq's configuration: ``str`` Enums, one per kind of choice.

Each is a ``str`` Enum: ``Scale.SUM == "sum"``, it serializes to JSON as its value, and a bad
value is a one-line :class:`~masq.errors.ConfigError` via :func:`choice`. :mod:`masq.config`
re-exports every name here; import them from there.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import TypeVar

from masq.errors import ConfigError


class Choice(str, Enum):
    """Base of every choice: a ``str`` whose ``str()`` and format are its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The accepted spellings, in definition order."""
        return tuple(m.value for m in cls)


class Scale(Choice):
    """Scale convention of MaSQ."""

    MEAN = "mean"  # the paper: squared gradient of the batch-MEAN loss
    SUM = "sum"  # the authors' group code: squared gradient of the SUMMED loss / batch size


class FisherLabels(Choice):
    """How the Fisher's per-sample gradients get their labels, named as van de Ven (2025, "On
    the computation of the Fisher information in continual learning", arXiv:2502.11756) names
    them; :func:`masq.importance.fisher` states each formula.

    masq 0.1's spellings are accepted and mean the same: "true" is ``empirical`` and
    "sampled" is ``sample`` (``FisherLabels("true") is FisherLabels.EMPIRICAL``). Run ids keep
    the old spellings (:data:`LEGACY_ID_VALUES`), so stored runs keep their ids.
    """

    EMPIRICAL = "empirical"  # the data's labels: the empirical Fisher (the paper's FIM)
    SAMPLE = "sample"  # one label per sample drawn from the model's softmax
    EXACT = "exact"  # every class c, weighted by the softmax probability p_c(x_n)
    PREDICTED = "predicted"  # the model's most probable class, argmax_c p_c(x_n)
    BATCHED = "batched"  # squared gradient of the batch-mean loss (true labels) at B = b
    TRUE = "empirical"  # alias of EMPIRICAL (masq 0.1's name)
    SAMPLED = "sample"  # alias of SAMPLE (masq 0.1's name)

    @classmethod
    def _missing_(cls, value: object) -> FisherLabels | None:
        """masq 0.1's spellings: "true" -> EMPIRICAL, "sampled" -> SAMPLE."""
        return {"true": cls.EMPIRICAL, "sampled": cls.SAMPLE}.get(str(value))

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The accepted spellings: the five names, then masq 0.1's "true" and "sampled"."""
        return (*(m.value for m in cls), "true", "sampled")


LEGACY_ID_VALUES: dict[str, dict[str, str]] = {
    "fisher_labels": {"empirical": "true", "sample": "sampled"},
}
"""{field: {value: the spelling its run id hashes}}: values renamed since masq 0.1 enter the run
id (:func:`masq.runid.id_dict`) in their old spelling, so stored runs keep their ids."""


class Scenario(Choice):
    """What the network is told and asked (van de Ven & Tolias 2019, "Three scenarios for
    continual learning"): :mod:`masq.scenarios` relabels the tasks and sets the heads."""

    CLASS = "class"  # one shared head over all classes; no task identity (the paper's setting)
    TASK = "task"  # task identity given at training and test: the other tasks' units masked
    DOMAIN = "domain"  # every task onto one shared label set (its classes' positions)
    CLASS_BLOCKS = "class-blocks"  # class-incremental with each task's classes new ones


class AdamState(Choice):
    """What Adam's state does between tasks."""

    RESET = "reset"  # a fresh Adam for every task (the paper's protocol)
    KEEP = "keep"  # one Adam across all tasks: moments and step count carried on


class SIGradient(Choice):
    """Which gradient SI's path integral ω = Σ_s −g(s)·Δθ(s) takes (:mod:`masq.importance.si`)."""

    TASK = "task"  # ∇ of the task's loss alone (Zenke et al.'s code)
    TOTAL = "total"  # ∇ of the loss the step minimised, penalty included (van de Ven's code)


class ClassUnits(Choice):
    """Which output units a class-incremental run (scenario ``class`` or ``class-blocks``)
    trains and evaluates with (:func:`masq.scenarios.seen_units`)."""

    ALL = "all"  # every unit of the head active from task 1 on
    SEEN = "seen"  # only the units of the classes seen so far (van de Ven & Tolias's code)


class ClassOrder(Choice):
    """Which classes form each task of a class-split SLT (``D<a>-<b>...``)."""

    FIXED = "fixed"  # the SLT's blocks over its order (0, 1, ..., or the spec's explicit one)
    SEEDED = "seeded"  # the blocks over a permutation of the classes drawn from the run's seed


class Init(Choice):
    """Initialization of the MLP (see :mod:`masq.models`)."""

    TORCH = "torch"  # PyTorch's nn.Linear default
    TF = "tf"  # truncated normal(0, 0.1), bias 0.1 (the authors' TensorFlow tutorial)


class Transfer(Choice):
    """How IMM trains task t from the previous solution (Lee et al. 2017, section 3.2)."""

    WEIGHT = "weight"  # start from the previous weights (weight transfer)
    L2 = "l2"  # ... plus λ_T Σ (θ − θ_prev)² (L2-transfer, λ_T = transfer_lam)
    DROP = "drop"  # ... with dropout of θ − θ_prev at rate drop_p (drop-transfer)
    L2_DROP = "l2-drop"  # both


class Precision(Choice):
    """Arithmetic of training and evaluation (importance passes always run in float32)."""

    FP32 = "fp32"  # float32 everywhere
    BF16 = "bf16"  # matmuls in bfloat16 (autocast); float32 weights, Adam state, loss, penalty


class EvalSchedule(Choice):
    """When a phase's curve is recorded (:func:`masq.training.eval_iterations`)."""

    EVERY = "every"  # every ``eval_every`` iterations (and at 0 and the end)
    PAPER = "paper"  # after every iteration, as the paper measured "best"
    DENSE_EARLY = "dense-early"  # every 2 iterations up to 100, every 20 up to 1000, then 100


class Executor(Choice):
    """Where a grid's groups run."""

    LOCAL = "local"  # a pool of local worker processes
    RAY = "ray"  # tasks on a Ray cluster


class Criterion(Choice):
    """The paper's two selection criteria of a configuration: "best" and "last"."""

    BEST = "best"  # the highest union accuracy reached during the final phase
    LAST = "last"  # the union accuracy at the end of the final phase


class SelectOn(Choice):
    """Which curves select a winner."""

    TEST = "test"  # the test curves (what the paper did)
    VAL = "val"  # the validation curves (the honest choice)


E = TypeVar("E", bound=Choice)

DEVICE_HELP = "use 'cpu', 'cuda', 'cuda:N' or 'auto'"
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def check_device_name(name: object) -> str:
    """``name`` if it is a device name masq accepts, else a one-line ConfigError."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise ConfigError(f"device: unknown device {name!r}; {DEVICE_HELP}")
    return name


def choice(kind: type[E], value: object, what: str) -> E:
    """``value`` as a member of ``kind``, else a one-line ConfigError naming ``what``."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(
            f"{what}: unknown value {value!r}; use one of {', '.join(kind.values())}"
        ) from None
