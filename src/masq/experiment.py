"""The two-task EWC protocol of PAPER.md section 3 -> a :class:`Result` record.

Stages, so a grid can share work (PAPER.md section 3):

    tasks   = make_tasks(config)                         # SLT from the dataset
    d1      = train_d1(config, tasks)                    # step 1: train on D1 (lambda = 0)
    imp     = compute_importance(config, d1, tasks)      # steps 2-3: anchor + importance pass
    result  = retrain_d2(config, d1, imp, tasks)         # steps 4-5: re-train on D2 with EWC
    run(config) == retrain_d2(config, d1, imp, tasks)    # all four in one call

and :func:`compare` (the headline of ``masq compare``): D1 trained once, then re-trained on
D2 from that one state without EWC, with EWC+FIM and with EWC+MaSQ in both scales.

Random streams. Every source of randomness has its own ``torch.Generator`` seeded by
``stream_seed(config.seed, name)`` = the first 8 bytes of sha256("masq:<seed>:<name>") (63
bits), for the names "tasks" (the pixel permutation of permuted SLTs), "init" (the D1
model's initialization), "d1-batches" (D1's mini-batch stream), "d2-batches" (D2's mini-batch
stream) and "fisher-labels" (labels sampled from the model for ``fisher_labels="sampled"``).
Each depends on ``seed`` only: K re-training runs that share a D1 state (a grid over lr2, lam,
importance...) see exactly the same D2 mini-batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from masq import __version__
from masq import ewc as masq_ewc
from masq import importance as masq_importance
from masq import tasks as masq_tasks
from masq.curves import best_and_last_indices
from masq.errors import ConfigError
from masq.fileio import atomic_write
from masq.models import INITS, check_hidden, mlp
from masq.runtime import check_device_name, resolve_device
from masq.tasks import Task
from masq.train import DEFAULT_EVAL_EVERY, TrainConfig, train_task

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

IMPORTANCES: tuple[str, ...] = ("fisher", "masq", "none")
SCALES: tuple[str, ...] = ("mean", "sum")
FISHER_LABELS: tuple[str, ...] = ("true", "sampled", "exact")
STREAMS: tuple[str, ...] = ("tasks", "init", "d1-batches", "d2-batches", "fisher-labels")
UNION = "D1∪D2"


def stream_seed(seed: int, stream: str) -> int:
    """The seed of random stream ``stream`` of run ``seed``: sha256("masq:<seed>:<stream>")[:8]
    read as a big-endian integer, masked to 63 bits."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {STREAMS}")
    digest = hashlib.sha256(f"masq:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


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
    eval_every: int = DEFAULT_EVAL_EVERY
    eval_val: bool = False  # also evaluate on the validation sets (for --select-on val)
    seed: int = 0
    device: str = "cpu"  # "cpu" | "cuda" | "auto"; not part of the run id

    def validate(self) -> ExperimentConfig:
        """Raise ConfigError (one line, naming the field and the fix) for any bad value."""
        masq_tasks.parse_spec(self.slt)
        if len(masq_tasks.parse_spec(self.slt).task_classes) != 2:
            raise ConfigError(
                f"slt: the EWC experiment needs a two-task SLT (e.g. D5-5, D9-1, DP10-10), "
                f"got {self.slt!r}"
            )
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"dataset: give a dataset name such as 'mnist', got {self.dataset!r}")
        check_hidden(self.hidden)
        _choice("init", self.init, INITS)
        _choice("importance", self.importance, IMPORTANCES)
        _choice("scale", self.scale, SCALES)
        _choice("fisher_labels", self.fisher_labels, FISHER_LABELS)
        for name in ("lr1", "lr2"):
            _positive_float(name, getattr(self, name))
        if not _is_real(self.lam) or not math.isfinite(self.lam) or self.lam < 0:
            raise ConfigError(f"lam: the EWC weight must be a finite number >= 0, got {self.lam!r}")
        for name in ("masq_batch", "iters1", "iters2", "batch_size", "eval_every"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.eval_val, bool):
            raise ConfigError(f"eval_val: must be true or false, got {self.eval_val!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be an integer >= 0, got {self.seed!r}")
        check_device_name(self.device)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Inverse of to_dict; unknown keys are a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown}; known keys: {sorted(known)}")
        values = dict(d)
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        return cls(**values)

    def with_(self, **changes: Any) -> ExperimentConfig:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: unknown value {value!r}; use one of {', '.join(allowed)}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_float(name: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise ConfigError(f"{name}: must be a finite number > 0, got {value!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}: must be an integer > 0, got {value!r}")


# A curve: {"iteration": [...], "<set name>": [accuracy, ...], ...}; set names are
# "D1", "D2", "D1∪D2" (test sets) and, with eval_val, "val:D1", "val:D2", "val:D1∪D2".
Curve = dict[str, list[float]]


@dataclass
class D1State:
    """The state after training on D1: what every D2 run of a grid starts from.

    ``state_dict`` lives on the CPU (cloned), whatever device trained it."""

    config: ExperimentConfig
    state_dict: dict[str, Tensor]
    curve: Curve
    seconds: float


@dataclass
class Result:
    """One run's record. ``best``/``last`` hold {"D1∪D2", "D1", "D2", "iteration"} (and the
    "val:" sets with eval_val) at the point of the highest / the final D1∪D2 accuracy during
    re-training. ``importance_summary`` is {tensor name: {"max", "mean"}}; ``timings`` is
    {"d1_train", "importance", "d2_train"} in seconds; ``meta`` records the software and
    device that produced it (masq and torch versions, device, threads)."""

    config: ExperimentConfig
    curve_d1: Curve
    curve_d2: Curve
    best: dict[str, float]
    last: dict[str, float]
    importance_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as JSON text (UTF-8, floats written exactly by repr)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict()
        return json.dumps(d, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Result:
        """Inverse of :meth:`to_json`; a malformed record is a ConfigError."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"result: not valid JSON ({err.msg} at line {err.lineno})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        required = {"config", "curve_d1", "curve_d2", "best", "last"}
        if not isinstance(d, dict) or set(d) - known or not required <= set(d):
            raise ConfigError(
                f"result: expected a JSON object with the keys {sorted(required)} "
                f"(optionally {sorted(known - required)})"
            )
        d["config"] = ExperimentConfig.from_dict(d["config"])
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temp file + rename)."""
        return atomic_write(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read a record written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def make_tasks(config: ExperimentConfig, *, data_dir: str | None = None) -> list[Task]:
    """The SLT's two tasks from ``config.dataset`` (permutations seeded by the "tasks" stream)."""
    tasks = masq_tasks.make(
        config.slt,
        dataset=config.dataset,
        seed=stream_seed(config.seed, "tasks"),
        data_dir=data_dir,
    )
    if len(tasks) != 2:
        raise ConfigError(
            f"slt: the EWC experiment needs a two-task SLT (e.g. D5-5), got {len(tasks)} tasks"
        )
    return tasks


def eval_sets(
    config: ExperimentConfig, tasks: list[Task]
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, tuple[str, ...]]]:
    """The evaluation sets {"D1", "D2"} (test parts; with eval_val also "val:D1", "val:D2")
    and the unions {"D1∪D2": ("D1", "D2"), ...} computed from their counts."""
    sets = {"D1": tasks[0].test, "D2": tasks[1].test}
    unions: dict[str, tuple[str, ...]] = {UNION: ("D1", "D2")}
    if config.eval_val:
        sets |= {"val:D1": tasks[0].val, "val:D2": tasks[1].val}
        unions[f"val:{UNION}"] = ("val:D1", "val:D2")
    return sets, unions


def build_model(config: ExperimentConfig, tasks: list[Task]) -> nn.Sequential:
    """The freshly initialized network of ``config`` (seeded by the "init" stream)."""
    in_features = int(tasks[0].train[0].shape[1])
    classes = max(max(t.classes) for t in tasks) + 1
    return mlp(
        config.hidden,
        in_features=in_features,
        classes=classes,
        init=config.init,
        seed=stream_seed(config.seed, "init"),
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_phase(
    config: ExperimentConfig,
    tasks: list[Task],
    model: nn.Module,
    *,
    phase: int,
    penalty: Callable[[nn.Module], Tensor] | None,
    device: torch.device,
    progress: bool,
) -> tuple[Curve, float]:
    """Train ``model`` on ``tasks[phase]`` (0: D1 at lr1 for iters1, 1: D2 at lr2 for iters2),
    evaluating on :func:`eval_sets`; returns (curve, seconds)."""
    lr, iters, stream, desc = (
        (config.lr1, config.iters1, "d1-batches", "train D1")
        if phase == 0
        else (config.lr2, config.iters2, "d2-batches", f"re-train D2 ({method_label(config)})")
    )
    sets, unions = eval_sets(config, tasks)
    train_config = TrainConfig(
        lr=lr,
        iters=iters,
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        seed=stream_seed(config.seed, stream),
    )
    start = time.perf_counter()
    curve = train_task(
        model,
        tasks[phase].train,
        train_config,
        penalty=penalty,
        eval_sets=sets,
        unions=unions,
        device=device,
        progress=progress,
        desc=desc,
    )
    _synchronize(device)
    return curve, time.perf_counter() - start


def train_d1(config: ExperimentConfig, tasks: list[Task], *, progress: bool = False) -> D1State:
    """Step 1: train a fresh network on D1 (no penalty) at lr1 for iters1 iterations."""
    config.validate()
    device = resolve_device(config.device)
    model = build_model(config, tasks)
    curve, seconds = _train_phase(
        config, tasks, model, phase=0, penalty=None, device=device, progress=progress
    )
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return D1State(config=config, state_dict=state, curve=curve, seconds=seconds)


def check_same_d1(config: ExperimentConfig, d1: D1State) -> None:
    """ConfigError unless ``config`` agrees with the config ``d1`` was trained with on every
    field of :data:`D1_FIELDS` (a D2 run must start from its own D1 state)."""
    differ = [f for f in D1_FIELDS if getattr(config, f) != getattr(d1.config, f)]
    if differ:
        raise ConfigError(
            f"this config differs from the D1 state in {differ}; train D1 with this config"
        )


def _model_from(config: ExperimentConfig, d1: D1State, tasks: list[Task]) -> nn.Sequential:
    model = build_model(config, tasks)
    model.load_state_dict(d1.state_dict)
    return model


def compute_importance(
    config: ExperimentConfig, d1: D1State, tasks: list[Task]
) -> tuple[dict[str, Tensor], float]:
    """(importance, seconds) on D1's training data from the D1 state; {} for "none".

    One pass over D1's training set in order, in batches of ``masq_batch``: MaSQ averages
    the squared batch-mean gradients (``scale``), the FIM is exact per sample whatever the
    batch size (labels from ``fisher_labels``; "sampled" uses the "fisher-labels" stream).
    """
    config.validate()
    check_same_d1(config, d1)
    if config.importance == "none":
        return {}, 0.0
    device = resolve_device(config.device)
    model = _model_from(config, d1, tasks).to(device)
    x, y = tasks[0].train
    batches = masq_importance.batches(x, y, config.masq_batch)
    start = time.perf_counter()
    if config.importance == "fisher":
        imp = masq_importance.fisher(
            model,
            batches,
            labels=config.fisher_labels,
            generator=torch.Generator(device=device).manual_seed(
                stream_seed(config.seed, "fisher-labels")
            ),
            device=device,
        )
    else:
        imp = masq_importance.masq(model, batches, scale=config.scale, device=device)
    _synchronize(device)
    return imp, time.perf_counter() - start


def summarize(importance: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """{tensor name: {"max": max_k F_k, "mean": mean_k F_k}} of an importance dict."""
    full = masq_importance.summary(dict(importance))
    return {name: {k: float(stats[k]) for k in ("max", "mean")} for name, stats in full.items()}


def retrain_d2(
    config: ExperimentConfig,
    d1: D1State,
    importance: dict[str, Tensor],
    tasks: list[Task],
    importance_seconds: float = 0.0,
    *,
    progress: bool = False,
) -> Result:
    """Steps 4-5: re-train the D1 state on D2 at lr2 for iters2 iterations with the loss
    L = L_CE + (lam / 2) sum_i F_i (theta_i - theta*_i)^2, theta* = the D1 state.

    With ``importance="none"`` or ``lam == 0`` no penalty is added (for lam = 0 this is
    bitwise the same training as adding the zero penalty, see tests/test_ewc.py).
    """
    config.validate()
    check_same_d1(config, d1)
    device = resolve_device(config.device)
    model = _model_from(config, d1, tasks).to(device)
    penalty: Callable[[nn.Module], Tensor] | None = None
    if config.importance != "none":
        anchor = masq_ewc.anchor(model, importance)  # checks keys: never a silent zero penalty
        if config.lam > 0:
            lam = config.lam

            def penalty(m: nn.Module) -> Tensor:
                return masq_ewc.penalty(m, anchor, lam)

    curve, seconds = _train_phase(
        config, tasks, model, phase=1, penalty=penalty, device=device, progress=progress
    )
    best, last = best_and_last(curve)
    return Result(
        config=config,
        curve_d1=d1.curve,
        curve_d2=curve,
        best=best,
        last=last,
        importance_summary=summarize(importance) if importance else {},
        timings={"d1_train": d1.seconds, "importance": importance_seconds, "d2_train": seconds},
        meta={
            "masq_version": __version__,
            "torch_version": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
    )


def best_and_last(curve: Curve, key: str = UNION) -> tuple[dict[str, float], dict[str, float]]:
    """The "best" and "last" points of a re-training curve by ``key``.

    best = the evaluation after at least one re-training step (iteration > 0) where ``key``
    is highest (the earliest on ties, NaNs ignored); last = the final evaluation. Each is
    {set name: accuracy at that point, ..., "iteration": its iteration}.
    """
    if key not in curve or not curve["iteration"]:
        raise ConfigError(f"curve has no {key!r} values; evaluate on D1 and D2 while training")
    best_i, last_i = best_and_last_indices(curve, key)

    def point(i: int) -> dict[str, float]:
        return {name: values[i] for name, values in curve.items()}

    return point(best_i), point(last_i)


def method_label(config: ExperimentConfig) -> str:
    """A short human name of the consolidation: "no EWC", "EWC+FIM", "EWC+MaSQ (mean)"..."""
    if config.importance == "none":
        return "no EWC"
    if config.importance == "fisher":
        return "EWC+FIM" if config.fisher_labels == "true" else f"EWC+FIM ({config.fisher_labels})"
    return f"EWC+MaSQ ({config.scale})"


def run(config: ExperimentConfig, *, progress: bool = False, data_dir: str | None = None) -> Result:
    """The whole protocol for one config: tasks, D1 training, importance, D2 re-training."""
    config.validate()
    resolve_device(config.device)
    tasks = make_tasks(config, data_dir=data_dir)
    d1 = train_d1(config, tasks, progress=progress)
    importance, seconds = compute_importance(config, d1, tasks)
    return retrain_d2(config, d1, importance, tasks, seconds, progress=progress)


# The four ways of `masq compare`: key -> (label, changes to the base config).
COMPARE_METHODS: dict[str, dict[str, Any]] = {
    "none": {"importance": "none", "lam": 0.0},
    "fisher": {"importance": "fisher"},
    "masq-mean": {"importance": "masq", "scale": "mean"},
    "masq-sum": {"importance": "masq", "scale": "sum"},
}


def compare_configs(base: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """{method key: config}: ``base`` with each of :data:`COMPARE_METHODS`' changes."""
    return {key: base.with_(**changes).validate() for key, changes in COMPARE_METHODS.items()}


def compare(
    base: ExperimentConfig, *, progress: bool = False, data_dir: str | None = None
) -> dict[str, Result]:
    """Train D1 once, compute FIM and MaSQ (both scales) from that one state and re-train on D2
    from it four ways (no EWC, EWC+FIM, EWC+MaSQ mean, EWC+MaSQ sum): {method key: Result}."""
    configs = compare_configs(base.validate())
    resolve_device(base.device)
    tasks = make_tasks(base, data_dir=data_dir)
    d1 = train_d1(base, tasks, progress=progress)
    results: dict[str, Result] = {}
    for key, config in configs.items():
        importance, seconds = compute_importance(config, d1, tasks)
        results[key] = retrain_d2(config, d1, importance, tasks, seconds, progress=progress)
    return results
