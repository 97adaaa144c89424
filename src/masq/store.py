"""The result store: one JSON record per run, written atomically, loaded as a DataFrame.

Layout of a results directory ``DIR``::

    DIR/meta.json              {"format": "masq-results", "version": FORMAT_VERSION}
    DIR/runs/<id>.json         one finished run: {"run_id", "version", "result": record}
    DIR/errors/<id>.json       one failed run: {"run_id", "config", "error", "traceback"}
    DIR/d1/<key>.pt            cached task-1 states (shared by every run that starts there)
    DIR/importance/<key>.pt    cached importance passes of task 1

A run's id is ``sha256`` of the canonical JSON of its configuration (keys sorted, the RUN
fields such as ``device`` left out, fields added since format 1 left out while at their
default), cut to :data:`ID_LENGTH` hex digits: the same configuration always maps to the same
file whatever the order of its keys, and the ids of masq 0.1's runs are unchanged. Every write
goes through a temporary file and ``os.replace``: a run killed at any point leaves either the
whole record or none. Re-running a grid skips the ids already stored.

Format 2 (this masq) holds T-task records (per-phase curves, accuracy matrix); a directory
of format 1 (masq 0.1, two-task records) is refused with a message naming ``masq migrate``,
which converts it in place (:func:`migrate`). This module is torch-free except for the
tensor caches (imported lazily).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import traceback as tb
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from masq.config import FIELD, FIELDS, Choice, Stage, hidden_text
from masq.curves import VAL, best_and_last_indices, point, union_name
from masq.errors import ConfigError
from masq.fileio import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from masq.protocol.result import Result

FORMAT = "masq-results"
FORMAT_VERSION = 2
ID_LENGTH = 20


# ----------------------------------------------------------------------------- run ids


def config_dict(config: Any) -> dict[str, Any]:
    """The JSON-ready dict of ``config`` (a RunConfig or a mapping of its fields): Enum members
    as values, floats as floats (``lam=1000`` and ``lam=1000.0`` are one run), tuples as
    lists."""
    d = dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config)
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Choice):
            v = v.value
        elif isinstance(v, tuple):
            v = list(v)
        spec = FIELD.get(k)
        if spec is not None and spec.kind is float and isinstance(v, int | float):
            v = float(v)
        out[k] = v
    return out


def id_dict(config: Any) -> dict[str, Any]:
    """The fields that make a run's id: all but RUN fields, and fields added since format 1
    only where they differ from their default."""
    d = config_dict(config)
    out = {}
    for k, v in d.items():
        spec = FIELD.get(k)
        if spec is not None and spec.stage == Stage.RUN:
            continue
        if spec is not None and spec.since_v1 and v == config_dict({k: spec.default})[k]:
            continue
        out[k] = v
    return out


def canonical_json(config: Any) -> str:
    """Canonical JSON of a configuration (:func:`id_dict`): sorted keys, no spaces."""
    return json.dumps(
        id_dict(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def run_id(config: Any) -> str:
    """``sha256(canonical_json(config))[:ID_LENGTH]``: stable, independent of key order."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:ID_LENGTH]


def key_of(values: Mapping[str, Any]) -> str:
    """A stable short hash of any JSON-ready mapping (the task-1 and importance cache keys)."""
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_LENGTH]


# ----------------------------------------------------------------------------- the store


def _meta_text(version: int = FORMAT_VERSION) -> str:
    return json.dumps({"format": FORMAT, "version": version}, indent=1) + "\n"


class Store:
    """A results directory (see the module docstring); ``create`` makes a fresh one.

    Opening a directory of another format version, or a non-empty directory that is not a
    results directory, is a one-line :class:`ConfigError`.
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
                "by masq; use a new --results directory"
            )
        elif create:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(meta, _meta_text())
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
        """Where run ``rid``'s record lives."""
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
        record = {"run_id": rid, "version": FORMAT_VERSION, "result": result.to_dict()}
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

    # --- tensors (task-1 states, importance)
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


def read_meta(meta: Path) -> dict[str, Any]:
    """The metadata of a results dir; unreadable or foreign: a one-line ConfigError."""
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{meta}: unreadable results metadata ({err}); use a new dir") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"{meta}: not a masq results directory; use a new --results directory")
    return info


def check_meta(meta: Path) -> None:
    """Raise ConfigError unless ``meta`` describes a results dir of this format version."""
    version = read_meta(meta).get("version")
    if version == 1:
        raise ConfigError(
            f"results dir {str(meta.parent)!r} was written by masq 0.1 (format 1); convert it "
            f"in place with `masq migrate {meta.parent}` (run ids stay the same)"
        )
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


def migrate(root: str | os.PathLike[str]) -> int:
    """Convert results dir ``root`` from format 1 to format 2 in place; the number of records
    converted (0 when it is already format 2). Each record is rewritten atomically and
    meta.json last, so an interrupted migration can simply be run again."""
    from masq.protocol.result import result_from_v1

    root = Path(root)
    meta = root / "meta.json"
    if not meta.exists():
        raise ConfigError(f"{str(root)!r} is not a results directory (no meta.json)")
    version = read_meta(meta).get("version")
    if version == FORMAT_VERSION:
        return 0
    if version != 1:
        raise ConfigError(f"results dir {str(root)!r} has unknown format version {version}")
    count = 0
    for path in sorted((root / "runs").glob("*.json")):
        record = read_json(path)
        if record.get("version") == FORMAT_VERSION:
            continue
        result = result_from_v1(record["result"])
        new = {"run_id": record["run_id"], "version": FORMAT_VERSION, "result": result}
        atomic_write(path, json.dumps(new, ensure_ascii=False) + "\n")
        count += 1
    atomic_write(meta, _meta_text())
    return count


# ----------------------------------------------------------------------------- loading


def open_store(root: str | os.PathLike[str]) -> Store:
    """An existing results directory (never creates one)."""
    return Store(root, create=False)


def flat_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One DataFrame row of a stored record: config columns, best./last. metrics (on the
    union of all tasks during the final phase), ACC/BWT/forgetting, timings.

    ``hidden`` becomes a string "800-400-400" (with ``layers`` its length), ``tasks`` is T;
    ``best.union`` / ``last.union`` are the accuracy on the union of all tasks whatever T.
    With validation curves, ``best_val.*``/``last_val.*`` hold every set at the first maximum
    / the end of the validation union (selection on validation data).
    """
    result = record["result"]
    config = {f.name: f.default for f in FIELDS} | dict(result["config"])
    config = config_dict(config)
    row: dict[str, Any] = {"run_id": record["run_id"]}
    row.update({k: v for k, v in config.items() if k != "hidden"})
    row["hidden"] = hidden_text(config["hidden"])
    row["layers"] = len(config["hidden"])
    curves = result["curves"]
    row["tasks"] = len(curves)
    union = union_name(len(curves))
    for crit in ("best", "last"):
        for k, v in result.get(crit, {}).items():
            row[f"{crit}.{k}"] = v
        row[f"{crit}.union"] = result[crit][union]
    final = curves[-1]
    if final.get(VAL + union):
        best_i, last_i = best_and_last_indices(final, VAL + union)
        for crit, i in (("best_val", best_i), ("last_val", last_i)):
            for k, v in point(final, i).items():
                row[f"{crit}.{k}"] = v
            row[f"{crit}.union"] = final[union][i]  # test accuracy at the selected point
            row[f"{crit}.val_union"] = final[VAL + union][i]  # what selects it
    for k, v in result.get("metrics", {}).items():
        row[k] = v
    for k, values in result.get("timings", {}).items():
        row[f"time.{k}"] = float(sum(values))
    return row


def load(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Every stored run of results dir ``root`` as a DataFrame, one row per run.

    Columns: ``run_id``, the configuration fields (``hidden`` as "800-800", plus ``layers``
    and ``tasks``), ``best.<set>`` / ``last.<set>`` (at the highest / the final accuracy on the
    union of all tasks during the final phase; ``best.iteration`` is where), ``best_val.*`` /
    ``last_val.*`` when runs evaluated the validation sets, ``average_accuracy``, ``bwt``,
    ``forgetting``, and ``time.*`` in seconds. Curves: :func:`load_result`.
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
    """Run ``rid`` as a :class:`masq.protocol.Result` (curves included)."""
    from masq.protocol.result import Result

    return Result.from_dict(load_record(root, rid)["result"])


def errors(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The recorded errors of ``root`` (runs that failed and have not since succeeded)."""
    return open_store(root).error_records()
