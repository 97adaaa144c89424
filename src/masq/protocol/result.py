"""A run's record: per-phase curves, the accuracy matrix and what is derived from them.

For a run over T tasks with curves recorded during each phase t = 1..T:

- the accuracy matrix ``R[i][j]`` = test accuracy on task j at the end of phase i (0-based);
- average accuracy ACC = (1/T) Σ_j ``R[T-1][j]``;
- backward transfer BWT = (1/(T-1)) Σ_{j<T-1} (``R[T-1][j]`` - ``R[j][j]``)
  (Lopez-Paz & Ranzato 2017);
- forgetting F = (1/(T-1)) Σ_{j<T-1} (max_{l<T-1} ``R[l][j]`` - ``R[T-1][j]``)
  (Chaudhry et al. 2018);
- the paper's "best" and "last": the point of the final phase where the accuracy on the
  union of all tasks is highest (after at least one step; the earliest on ties) and its end.

:func:`build_result` is the one place a :class:`Result` is assembled (the separate and the
stacked paths both call it). Records are JSON; the weights at the end of each phase travel
in memory only (:meth:`Result.save_weights` writes them as safetensors).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from masq import __version__
from masq.config import RunConfig
from masq.curves import Curve, best_and_last_indices, point, task_name, union_name
from masq.errors import ConfigError
from masq.fileio import atomic_write
from masq.importance import summary as importance_summary
from masq.runtime import cpu_model

RECORD_KEYS: tuple[str, ...] = (
    "config",
    "curves",
    "best",
    "last",
    "accuracy",
    "metrics",
    "importance_summary",
    "timings",
    "meta",
    "imm",
)
# Keys written only when not empty (records without them stay as they were).
OMITTED_WHEN_EMPTY: frozenset[str] = frozenset({"imm"})
REQUIRED_KEYS: frozenset[str] = frozenset({"config", "curves", "best", "last", "accuracy"})


@dataclass
class Result:
    """One run's record (module docstring). ``curves[t]`` is phase t's curve; ``best`` and
    ``last`` hold every set at those points of the final phase plus "iteration";
    ``importance_summary`` is {tensor: {"max", "mean"}} of task 1's importance; ``timings``
    holds "train" (seconds per phase) and "importance" (per importance pass); ``meta`` the
    software and device; ``imm`` (IMM runs only, :mod:`masq.protocol.imm`) the merge's α
    sweep and the selected α. ``weights`` (not serialized): the state dict at the end of
    every phase, on the CPU, when the run kept them."""

    config: RunConfig
    curves: list[Curve]
    best: dict[str, float]
    last: dict[str, float]
    accuracy: list[list[float]]
    metrics: dict[str, float] = field(default_factory=dict)
    importance_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    imm: dict[str, Any] = field(default_factory=dict)  # IMM runs: the α sweep (protocol.imm)
    weights: list[dict[str, Tensor]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (without the weights); a diverged run's non-finite importance
        summary becomes ``null``, so the record is valid JSON."""
        d = {
            k: getattr(self, k)
            for k in RECORD_KEYS
            if k not in OMITTED_WHEN_EMPTY or getattr(self, k)
        }
        d["config"] = self.config.to_dict()
        d["importance_summary"] = finite_json(d["importance_summary"])
        return d

    def to_json(self) -> str:
        """The record as JSON text (UTF-8, floats written exactly by repr)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        """Inverse of :meth:`to_dict`; a malformed record is a one-line ConfigError."""
        if not isinstance(d, Mapping) or set(d) - set(RECORD_KEYS) or not REQUIRED_KEYS <= set(d):
            raise ConfigError(
                f"result: expected a JSON object with the keys {sorted(REQUIRED_KEYS)} "
                f"(optionally {sorted(set(RECORD_KEYS) - REQUIRED_KEYS)}); "
                "a record of masq 0.1 is converted by `masq migrate`"
            )
        values = dict(d)
        values["config"] = RunConfig.from_dict(values["config"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Result:
        """Inverse of :meth:`to_json`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"result: not valid JSON ({err.msg} at line {err.lineno})") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temp file + rename)."""
        return atomic_write(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read a record written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save_weights(self, directory: str | Path, stem: str = "weights") -> list[Path]:
        """Write the weights at the end of every phase as ``<stem>_phase<t>.safetensors``
        (t = 1..T; no pickle) into ``directory``, atomically; the paths written."""
        from safetensors.torch import save

        if self.weights is None:
            raise ConfigError("this result kept no weights; run with keep_weights=True")
        paths = []
        for t, state in enumerate(self.weights, start=1):
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            blob = save(tensors, metadata={"phase": str(t), "slt": self.config.slt})
            paths.append(atomic_write(Path(directory) / f"{stem}_phase{t}.safetensors", blob))
        return paths


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict written by :meth:`Result.save_weights`."""
    from safetensors.torch import load_file

    return load_file(str(path))


def accuracy_matrix(curves: Sequence[Mapping[str, Sequence[float]]]) -> list[list[float]]:
    """``R[i][j]`` = the last value of task j's test accuracy in phase i's curve."""
    n = len(curves)
    missing = [task_name(j) for j in range(n) if task_name(j) not in curves[-1]]
    if missing:
        raise ConfigError(f"curves lack the test sets {missing}; evaluate on every task")
    return [[float(curve[task_name(j)][-1]) for j in range(n)] for curve in curves]


def transfer_metrics(r: Sequence[Sequence[float]]) -> dict[str, float]:
    """ACC, BWT and forgetting of the accuracy matrix ``r`` (module docstring)."""
    t = len(r)
    acc = sum(r[-1]) / t
    if t < 2:
        return {"average_accuracy": acc, "bwt": math.nan, "forgetting": math.nan}
    bwt = sum(r[-1][j] - r[j][j] for j in range(t - 1)) / (t - 1)
    forgetting = sum(max(r[i][j] for i in range(t - 1)) - r[-1][j] for j in range(t - 1)) / (t - 1)
    return {"average_accuracy": acc, "bwt": bwt, "forgetting": forgetting}


def best_and_last(curve: Curve, key: str) -> tuple[dict[str, float], dict[str, float]]:
    """The "best" and "last" points of a phase's curve by ``key`` (see
    :func:`masq.curves.best_and_last_indices`): {set name: value, ..., "iteration": it}."""
    if key not in curve or not curve["iteration"]:
        raise ConfigError(f"curve has no {key!r} values; evaluate on every task while training")
    best_i, last_i = best_and_last_indices(curve, key)
    return point(curve, best_i), point(curve, last_i)


def summarize(importance: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """{tensor name: {"max": max_k F_k, "mean": mean_k F_k}} of an importance dict."""
    full = importance_summary(dict(importance))
    return {name: {k: float(stats[k]) for k in ("max", "mean")} for name, stats in full.items()}


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """The first 16 hex digits of sha256 over ``state``'s tensors in name order (name, dtype,
    shape and bytes): equal for bit-equal states, so two records with the same one started
    from the same task-1 state."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_meta(device: torch.device, **extra: Any) -> dict[str, Any]:
    """What produced a record and when: masq and torch versions, device, the processor
    (:func:`masq.runtime.cpu_model`) and torch's CPU kernel level, threads, OpenMP's wait
    policy (``OMP_WAIT_POLICY`` as the environment set it, "default" where unset; the command
    line sets PASSIVE on a busy machine, :mod:`masq.cli.waitpolicy`), ``finished`` (UTC, ISO
    8601, to the second; the report's dates come from it), and ``extra`` (the run loops add
    ``task1_state``, :func:`state_fingerprint` of the task-1 state the run continued)."""
    finished = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {
        "masq_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "finished": finished.isoformat(),
        **extra,
    }


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or ±inf float (in nested dicts and lists) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def finite_state(state: Mapping[str, Tensor]) -> bool:
    """Whether every tensor of ``state`` holds finite values only."""
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def build_result(
    config: RunConfig,
    curves: Sequence[Curve],
    *,
    importance: Mapping[str, Tensor] | None,
    train_seconds: Sequence[float],
    importance_seconds: Sequence[float],
    meta: Mapping[str, Any],
    weights: list[dict[str, Tensor]] | None = None,
    diverged: str | None = None,
) -> Result:
    """The :class:`Result` of a run with phase curves ``curves`` (the only builder).
    ``diverged`` (e.g. "phase 1") records where the weights stopped being finite, as
    ``meta["diverged"]``; tables mark such runs."""
    if diverged:
        meta = {**meta, "diverged": diverged}
    best, last = best_and_last(curves[-1], union_name(len(curves)))
    r = accuracy_matrix(curves)
    return Result(
        config=config,
        curves=[dict(c) for c in curves],
        best=best,
        last=last,
        accuracy=r,
        metrics=transfer_metrics(r),
        importance_summary=summarize(importance) if importance else {},
        timings={
            "train": [float(s) for s in train_seconds],
            "importance": [float(s) for s in importance_seconds],
        },
        meta=dict(meta),
        weights=weights,
    )


def result_from_v1(d: Mapping[str, Any]) -> dict[str, Any]:
    """A record of store format 1 (masq 0.1: ``curve_d1``/``curve_d2``, timings d1_train,
    importance, d2_train) as a format-2 record dict; every stored number is kept."""
    curves = [d["curve_d1"], d["curve_d2"]]
    timings = d.get("timings", {})
    r = accuracy_matrix(curves)
    out = {
        "config": d["config"],
        "curves": curves,
        "best": d["best"],
        "last": d["last"],
        "accuracy": r,
        "metrics": transfer_metrics(r),
        "importance_summary": d.get("importance_summary", {}),
        "timings": {
            "train": [timings.get("d1_train", math.nan), timings.get("d2_train", math.nan)],
            "importance": [timings.get("importance", math.nan)],
        },
        "meta": {**d.get("meta", {}), "migrated_from": 1},
    }
    return out


__all__ = [
    "Result",
    "accuracy_matrix",
    "best_and_last",
    "build_result",
    "load_weights",
    "result_from_v1",
    "run_meta",
    "summarize",
    "transfer_metrics",
]
