"""The result store: one JSON record per run, written atomically, loaded as a DataFrame.

Layout of a results directory ``DIR``::

    DIR/meta.json              {"format": "masq-results", "version": FORMAT_VERSION}
    DIR/runs/<id>.json         one finished run: {"run_id", "version", "result": Result JSON}
    DIR/errors/<id>.json       one failed run: {"run_id", "config", "error", "traceback"}
    DIR/d1/<key>.pt            cached D1 states (shared by every run that starts from them)
    DIR/importance/<key>.pt    cached importance passes

A run's id is ``sha256`` of the canonical JSON of its configuration (keys sorted, the
``device`` left out, floats as floats), cut to :data:`ID_LENGTH` hex digits, so the same
configuration always maps to the same file whatever the order of its keys. Every write goes
through a temporary file in the same directory and ``os.replace``: a run killed at any point
(even ``kill -9``) leaves either the whole record or none. Re-running a grid skips the ids
already stored.

This module reads and writes JSON and tensors only; it never imports :mod:`masq.train`
(``masq.report`` builds on it). ``load_result`` imports :mod:`masq.experiment` lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import traceback as tb
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from masq.curves import best_and_last_indices
from masq.errors import ConfigError
from masq.fileio import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from masq.experiment import Result

FORMAT = "masq-results"
FORMAT_VERSION = 1
ID_LENGTH = 20
NOT_IN_ID: tuple[str, ...] = ("device",)
UNION = "D1∪D2"
VAL_UNION = "val:D1∪D2"


# ----------------------------------------------------------------------------- run ids


def config_dict(config: Any) -> dict[str, Any]:
    """The JSON-ready dict of ``config`` (an ExperimentConfig or a mapping), floats coerced.

    Fields annotated ``float`` become Python floats (so ``lam=1000`` and ``lam=1000.0`` are the
    same run); tuples become lists.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        d = dict(config.to_dict()) if hasattr(config, "to_dict") else dataclasses.asdict(config)
        for f in dataclasses.fields(config):
            if f.type in ("float", float) and isinstance(d.get(f.name), int | float):
                d[f.name] = float(d[f.name])
    elif isinstance(config, Mapping):
        d = dict(config)
    else:
        raise TypeError(f"run_id: expected an ExperimentConfig or a mapping, got {type(config)}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def canonical_json(config: Any) -> str:
    """Canonical JSON of a configuration: sorted keys, no spaces, ``device`` left out."""
    d = {k: v for k, v in config_dict(config).items() if k not in NOT_IN_ID}
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def run_id(config: Any) -> str:
    """``sha256(canonical_json(config))[:ID_LENGTH]``: stable, independent of key order."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:ID_LENGTH]


def key_of(values: Mapping[str, Any]) -> str:
    """A stable short hash of any JSON-ready mapping (used for D1 and importance cache keys)."""
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_LENGTH]


# ----------------------------------------------------------------------------- the store


class Store:
    """A results directory (see the module docstring); ``create`` makes a fresh one.

    Opening a directory written by another format version, or a non-empty directory that
    is not a results directory, is a one-line :class:`ConfigError`.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        meta = self.root / "meta.json"
        if meta.exists():
            check_meta(meta)
        elif self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"results dir {str(self.root)!r} is a file; give a directory path")
        elif (self.root / "runs").exists():
            raise ConfigError(
                f"results dir {str(self.root)!r} has runs/ but no meta.json: it was not written "
                "by this masq; use a new --results directory"
            )
        elif create:
            self.root.mkdir(parents=True, exist_ok=True)
            meta_text = json.dumps({"format": FORMAT, "version": FORMAT_VERSION}, indent=1)
            atomic_write(meta, meta_text + "\n")
        else:
            raise ConfigError(
                f"no results at {str(self.root)!r}; run `masq grid --results {self.root}` first"
            )
        self.runs = self.root / "runs"
        self.errors = self.root / "errors"
        self.d1 = self.root / "d1"
        self.importance = self.root / "importance"

    # --- runs
    def run_path(self, rid: str) -> Path:
        return self.runs / f"{rid}.json"

    def has(self, rid: str) -> bool:
        """Whether run ``rid`` is stored (finished)."""
        return self.run_path(rid).exists()

    def stored_ids(self) -> set[str]:
        """The ids of every finished run."""
        if not self.runs.exists():
            return set()
        return {p.stem for p in self.runs.glob("*.json")}

    def write_result(self, result: Result) -> str:
        """Store ``result`` as runs/<id>.json (atomically); clears an earlier error; its id."""
        rid = run_id(result.config)
        record = {"run_id": rid, "version": FORMAT_VERSION, "result": json.loads(result.to_json())}
        atomic_write(self.run_path(rid), json.dumps(record, ensure_ascii=False) + "\n")
        (self.errors / f"{rid}.json").unlink(missing_ok=True)
        return rid

    def write_record_text(self, rid: str, text: str) -> None:
        """Store an already serialized record (from a remote worker) unless it is there."""
        if not self.has(rid):
            atomic_write(self.run_path(rid), text)
            (self.errors / f"{rid}.json").unlink(missing_ok=True)

    def read_record(self, rid: str) -> dict[str, Any]:
        """The stored record of run ``rid`` as a dict."""
        return read_json(self.run_path(rid))

    # --- errors
    def write_error(self, config: Any, error: BaseException | str) -> str:
        """Record a failed run as errors/<id>.json with its message (and traceback); its id."""
        rid = run_id(config)
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
            trace = "".join(tb.format_exception(type(error), error, error.__traceback__))
        else:
            message, trace = str(error), ""
        record = {
            "run_id": rid,
            "config": config_dict(config),
            "error": message,
            "traceback": trace,
        }
        atomic_write(self.errors / f"{rid}.json", json.dumps(record, ensure_ascii=False) + "\n")
        return rid

    def error_records(self) -> list[dict[str, Any]]:
        """Every recorded error whose run has not since succeeded."""
        if not self.errors.exists():
            return []
        return [read_json(p) for p in sorted(self.errors.glob("*.json")) if not self.has(p.stem)]

    # --- tensors (D1 states, importance)
    def save_tensors(self, path: Path, obj: Any) -> None:
        """``torch.save(obj)`` to ``path`` atomically."""
        import torch

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        atomic_write(path, buffer.getvalue())

    def load_tensors(self, path: Path) -> Any | None:
        """The object saved at ``path``, or None when absent."""
        import torch

        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def check_meta(meta: Path) -> None:
    """Raise ConfigError unless ``meta`` describes a results dir of this format version."""
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{meta}: unreadable results metadata ({err}); use a new dir") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"{meta}: not a masq results directory; use a new --results directory")
    version = info.get("version")
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"results dir {str(meta.parent)!r} has format version {version}, this masq reads "
            f"version {FORMAT_VERSION}; use a new --results directory or the masq that wrote it"
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict; a corrupt one is a ConfigError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: corrupt record ({err}); delete it and re-run") from None


# ----------------------------------------------------------------------------- loading


def open_store(root: str | os.PathLike[str]) -> Store:
    """An existing results directory (never creates one)."""
    return Store(root, create=False)


def curve_points(curve: Mapping[str, list[float]], key: str) -> tuple[int, int]:
    """(index of the "best" point, index of the "last" point) of a re-training curve by ``key``.

    The rule of :func:`masq.curves.best_and_last_indices` (as ``experiment.best_and_last``).
    """
    return best_and_last_indices(curve, key)


def point(curve: Mapping[str, list[float]], index: int) -> dict[str, float]:
    """Every series of ``curve`` at position ``index``."""
    return {k: float(v[index]) for k, v in curve.items() if len(v) > index}


def flat_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One DataFrame row of a stored record: config columns, best./last. metrics, timings.

    ``hidden`` becomes a string "800-400-400" (with ``layers`` its length). With validation
    curves, ``best_val.*``/``last_val.*`` hold every set at the first maximum / the end of
    ``val:D1∪D2`` during re-training (selection on validation data).
    """
    result = record["result"]
    config = dict(result["config"])
    hidden = list(config.get("hidden", []))
    row: dict[str, Any] = {"run_id": record["run_id"]}
    row.update({k: v for k, v in config.items() if k != "hidden"})
    row["hidden"] = "-".join(str(h) for h in hidden)
    row["layers"] = len(hidden)
    for crit in ("best", "last"):
        for k, v in result.get(crit, {}).items():
            row[f"{crit}.{k}"] = v
    curve = result.get("curve_d2", {})
    if curve.get(VAL_UNION):
        best_i, last_i = curve_points(curve, VAL_UNION)
        for crit, i in (("best_val", best_i), ("last_val", last_i)):
            for k, v in point(curve, i).items():
                row[f"{crit}.{k}"] = v
    for k, v in result.get("timings", {}).items():
        row[f"time.{k}"] = v
    return row


def load(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Every stored run of results dir ``root`` as a DataFrame, one row per run.

    Columns: ``run_id``, the configuration fields (``hidden`` as "800-800", plus ``layers``),
    ``best.<set>`` / ``last.<set>`` (accuracy at the highest / the final D1∪D2 point of
    re-training; ``best.iteration`` is where), ``best_val.*`` / ``last_val.*`` when runs
    evaluated the validation sets, and ``time.*`` in seconds. Curves: :func:`load_result`.
    """
    store = open_store(root)
    rows = [flat_row(store.read_record(rid)) for rid in sorted(store.stored_ids())]
    return pd.DataFrame(rows)


def load_record(root: str | os.PathLike[str], rid: str) -> dict[str, Any]:
    """The raw stored record of run ``rid`` (its "result" holds the curves)."""
    store = open_store(root)
    if not store.has(rid):
        raise ConfigError(f"no run {rid!r} in {str(root)!r}; `masq table` lists the stored runs")
    return store.read_record(rid)


def load_result(root: str | os.PathLike[str], rid: str) -> Result:
    """Run ``rid`` as a :class:`masq.experiment.Result` (curves included)."""
    from masq.experiment import Result

    return Result.from_json(json.dumps(load_record(root, rid)["result"]))


def errors(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The recorded errors of ``root`` (runs that failed and have not since succeeded)."""
    return open_store(root).error_records()
