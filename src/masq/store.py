"""The result store: one JSON record per run, written atomically, loaded as a DataFrame.

Layout of a results directory ``DIR``::

    DIR/meta.json              {"format": "masq-results", "version": FORMAT_VERSION}
    DIR/runs/<id>.json         one finished run: {"run_id", "version", "result": record}
    DIR/errors/<id>.json       one failed run: {"run_id", "config", "error", "traceback"}
    DIR/d1/<key>.safetensors   cached task-1 states (shared by every run that starts there)
                               and DIR/d1/<key>.json, a sidecar: other fields, size, sha256
    DIR/importance/<key>.*     cached importance passes of task 1 (the same two files)
    DIR/invalid/               records found invalid, moved aside (their runs are redone)
    DIR/.lock                  held (flock) by the one grid running here (masq.grid)

A run's file is named by its id (:func:`masq.runid.run_id`: a stable hash of its configuration,
independent of key order), so the same configuration always maps to the same file. Every write
goes through a temporary file and ``os.replace``: a run killed at any point leaves either the
whole record or none. Re-running a grid skips the ids stored with a record that passes
:func:`check_record` (others go to ``invalid/``, with a warning, and are redone); a cached
tensor file that differs from its sidecar's size and sha256 is recomputed, with a warning. A
record that cannot be written is saved under :func:`masq.fileio.rescue_dir`
(:class:`NotStored`).

Format 2 (this masq) holds T-task records (per-phase curves, accuracy matrix); format 1 (masq
0.1, two-task records) is refused with a message naming ``masq migrate``, which converts it in
place (:func:`masq.migrate.migrate`). Torch-free but for the tensor caches (imported lazily).
"""

from __future__ import annotations

import json
import os
import traceback as tb
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from masq.config import FIELDS, RunConfig, hidden_text
from masq.curves import VAL, best_and_last_indices, point, union_name
from masq.errors import ConfigError
from masq.fileio import (
    atomic_write,
    error_text,
    out_dir_message,
    read_tensors,
    rescue,
    warn,
    writable_dir,
    write_tensors,
)
from masq.runid import config_dict, d1_key, run_id

if TYPE_CHECKING:  # pragma: no cover
    from masq.protocol.result import Result

FORMAT = "masq-results"
FORMAT_VERSION = 2
# The keys every stored result has (masq.protocol.result.REQUIRED_KEYS; a test checks both).
RESULT_KEYS = ("config", "curves", "best", "last", "accuracy")


class InvalidRecord(ConfigError):
    """A file in ``runs/`` that is not a valid record (``reason`` says why)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, " ".join(reason.split())
        super().__init__(
            f"{path}: not a valid run record ({self.reason}); `masq grid` on this results dir "
            "moves it to invalid/ and redoes the run (or delete it)"
        )


class NotStored(RuntimeError):
    """A finished run whose record could not be written (``rescued``: where it went, or None)."""

    def __init__(self, message: str, rescued: Path | None) -> None:
        super().__init__(message)
        self.rescued = rescued


# ----------------------------------------------------------------------------- the store


def meta_text(version: int = FORMAT_VERSION) -> str:
    """The text of a results dir's ``meta.json`` at format ``version``."""
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
        elif (self.root / "runs").exists():
            raise ConfigError(
                f"results dir {str(self.root)!r} has runs/ but no meta.json: it was not written "
                "by masq; use a new --results directory"
            )
        elif create:
            try:
                writable_dir(self.root)
                atomic_write(meta, meta_text())
            except OSError as err:
                raise ConfigError(out_dir_message(self.root, err, "--results")) from None
        else:
            raise ConfigError(
                f"no results at {str(self.root)!r}; run `masq grid --results {self.root}` first"
            )
        self.runs = self.root / "runs"
        self.errors = self.root / "errors"
        self.d1 = self.root / "d1"
        self.importance = self.root / "importance"
        self.invalid = self.root / "invalid"
        self._checked: dict[str, tuple[int, int, int]] = {}

    # --- before a grid
    def check_writable(self) -> None:
        """Create the store's folders and prove each writable; a one-line ConfigError if not."""
        for folder in (self.root, self.runs, self.errors, self.d1, self.importance):
            try:
                writable_dir(folder)
            except OSError as err:
                raise ConfigError(out_dir_message(folder, err, "--results")) from None

    # --- runs
    def run_path(self, rid: str) -> Path:
        """Where run ``rid``'s record lives."""
        return self.runs / f"{rid}.json"

    def has(self, rid: str, *, repair: bool = True) -> bool:
        """Whether run ``rid`` is stored with a valid record (:func:`check_record`); an invalid
        one is moved to invalid/ with a warning (unless not ``repair``)."""
        return self._valid(self.run_path(rid), repair)

    def stored_ids(self, *, repair: bool = True) -> set[str]:
        """The ids of every finished run whose record is valid (see :meth:`has`)."""
        if not self.runs.exists():
            return set()
        return {p.stem for p in sorted(self.runs.glob("*.json")) if self._valid(p, repair)}

    def listed_ids(self) -> set[str]:
        """The names in runs/ (unverified; cheap, for progress bars)."""
        return {p.stem for p in self.runs.glob("*.json")} if self.runs.exists() else set()

    def _valid(self, path: Path, repair: bool) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._checked.get(path.name) == signature:
            return True
        try:
            check_record(path)
        except InvalidRecord as err:
            if repair:
                self.set_aside(path, err.reason)
            return False
        self._checked[path.name] = signature
        return True

    def set_aside(self, path: Path, reason: str) -> None:
        """Move the invalid record ``path`` to invalid/ (never overwriting) with a warning."""
        dest, n = self.invalid / path.name, 1
        while dest.exists():
            dest, n = self.invalid / f"{path.stem}.{n}{path.suffix}", n + 1
        try:
            self.invalid.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
        except FileNotFoundError:
            return  # another process moved it first
        except OSError as err:
            dest = f"nowhere ({error_text(err)})"  # type: ignore[assignment]
        warn(f"{path} is not a valid run record ({reason}); moved to {dest}; run to be redone")

    def write_result(self, result: Result) -> str:
        """Store ``result`` as runs/<id>.json (atomically); clears an earlier error; its id.

        A failing write raises :class:`NotStored` after saving the record under
        :func:`masq.fileio.rescue_dir` of the results dir (a warning line says where)."""
        rid = run_id(result.config)
        record = {"run_id": rid, "version": FORMAT_VERSION, "result": result.to_dict()}
        self._write_run(rid, json.dumps(record, ensure_ascii=False) + "\n")
        return rid

    def write_record_text(self, rid: str, text: str) -> None:
        """Store an already serialized record (from a remote worker) unless it is there."""
        if not self.has(rid):
            self._write_run(rid, text)

    def _write_run(self, rid: str, text: str) -> None:
        path = self.run_path(rid)
        try:
            atomic_write(path, text)
        except OSError as err:
            try:
                saved: Path | None = rescue(self.root, f"runs/{rid}.json", text)
                where = f"saved to {saved} instead (copy it into {self.runs} to keep it)"
            except OSError as again:
                saved, where = None, f"and could not be saved elsewhere ({error_text(again)})"
            message = f"could not write {path} ({error_text(err)}); the finished run was {where}"
            warn(message)
            raise NotStored(message, saved) from err
        try:
            (self.errors / f"{rid}.json").unlink(missing_ok=True)
        except OSError:
            pass  # a stale error record is ignored once the run is stored (error_records)

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
        record = {"run_id": rid, "config": config_dict(config), "error": message}
        try:
            text = json.dumps(record | {"traceback": trace}, ensure_ascii=False) + "\n"
            atomic_write(self.errors / f"{rid}.json", text)
        except OSError as err:  # the error is still reported by the grid's summary
            warn(f"could not record the failure of run {rid} in {self.errors}: {error_text(err)}")
        return rid

    def error_records(self) -> list[dict[str, Any]]:
        """Every recorded error whose run has not since succeeded."""
        if not self.errors.exists():
            return []
        return [read_json(p) for p in sorted(self.errors.glob("*.json")) if not self.has(p.stem)]

    # --- tensors (task-1 states, importance)
    def save_tensors(self, path: Path, payload: Mapping[str, Any]) -> None:
        """Write ``payload`` with :func:`masq.fileio.write_tensors`: its non-empty mappings of
        tensors into the safetensors file ``path`` (keys as they are when there is one, a plain
        state dict; else ``<field>/<name>``), the rest into its checksummed JSON sidecar."""
        import torch

        tensors, meta, fields = {}, {}, []
        for key, value in payload.items():
            if isinstance(value, Mapping) and value and all(map(torch.is_tensor, value.values())):
                fields.append(key)
                tensors.update({f"{key}/{name}": t for name, t in value.items()})
            else:
                meta[key] = value
        if len(fields) == 1:
            tensors = {name.partition("/")[2]: t for name, t in tensors.items()}
        write_tensors(path, tensors, {"tensors": fields, "meta": meta})

    def load_tensors(self, path: Path) -> dict[str, Any] | None:
        """The payload saved at ``path`` by :meth:`save_tensors`; None when absent, or (with a
        warning naming the file) when missing, truncated, changed or unreadable: to recompute."""
        if not path.with_suffix(".json").exists() and not path.exists():
            return None  # never computed
        try:
            flat, info = read_tensors(path)
            fields = info["tensors"]
            out: dict[str, Any] = dict(info["meta"]) | {key: {} for key in fields}
            for name, t in flat.items():
                key, _, sub = (fields[0], "", name) if len(fields) == 1 else name.partition("/")
                out[key][sub] = t
        except (OSError, ValueError, KeyError, TypeError) as err:
            warn(f"cached tensors {path} are invalid ({' '.join(str(err).split())}); recomputing")
            return None
        return out


def read_meta(meta: Path) -> dict[str, Any]:
    """The metadata of a results dir; unreadable or foreign: a one-line ConfigError."""
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, not JSON
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
    """A JSON object from a file; unreadable, not UTF-8, not JSON or not an object: a one-line
    ConfigError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        reason = " ".join(str(err).split())
        raise ConfigError(f"{path}: corrupt record ({reason}); delete it and re-run") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: corrupt record (not a JSON object); delete it and re-run")
    return value


def check_record(path: Path, text: str | None = None) -> dict[str, Any]:
    """The record at ``path`` (runs/<id>.json; ``text``: its content) if valid, else InvalidRecord.

    Valid: UTF-8 JSON (``NaN`` tokens as Python reads them), an object whose ``run_id`` is the
    file's name and ``version`` is :data:`FORMAT_VERSION`, whose ``result`` has the keys
    :data:`RESULT_KEYS`, whose config builds a RunConfig of that run id, and which makes a
    table row (:func:`flat_row`)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except OSError as err:
        raise InvalidRecord(path, f"unreadable: {error_text(err)}") from None
    except UnicodeDecodeError:
        raise InvalidRecord(path, "not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InvalidRecord(path, f"truncated or not JSON: {err}") from None
    if not isinstance(record, dict):
        raise InvalidRecord(path, "not a JSON object")
    if record.get("run_id") != path.stem:
        raise InvalidRecord(path, f"its run_id {record.get('run_id')!r} is not its file name")
    if record.get("version") != FORMAT_VERSION:
        raise InvalidRecord(path, f"version {record.get('version')!r}, not {FORMAT_VERSION}")
    result: Any = record.get("result")  # a dict when nothing is missing
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise InvalidRecord(path, f"its result lacks {missing}")
    try:
        config = result["config"]
        if not isinstance(config, dict):
            raise ConfigError("not a JSON object")
        rid = run_id(RunConfig.from_dict(config))
    except (ConfigError, TypeError, ValueError, AttributeError, KeyError) as err:
        raise InvalidRecord(path, f"bad config: {err}") from None
    if rid != path.stem:
        raise InvalidRecord(path, f"its config has the run id {rid}")
    try:
        flat_row(record)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise InvalidRecord(path, f"malformed result ({type(err).__name__}: {err})") from None
    return record


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
    / the end of the validation union (selection on validation data); a run that trained on
    its validation images (``train_on_val``) has none, so nothing selects on images it fitted."""
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
    if final.get(VAL + union) and not config["train_on_val"]:
        best_i, last_i = best_and_last_indices(final, VAL + union)
        for crit, i in (("best_val", best_i), ("last_val", last_i)):
            for k, v in point(final, i).items():
                row[f"{crit}.{k}"] = v
            row[f"{crit}.union"] = final[union][i]  # test accuracy at the selected point
            row[f"{crit}.val_union"] = final[VAL + union][i]  # what selects it
    row |= result.get("metrics", {})
    row["task1"] = d1_key(config)  # the runs that share its task-1 state (masq.grid.plan)
    first = result["accuracy"][0] if result["accuracy"] else []  # decided by the task-1 state
    row["after_task1"] = "|".join(map(str, first)) if isinstance(first, list) else ""
    meta = result.get("meta", {})
    row["task1_state"] = str(meta.get("task1_state") or "")  # "" in older records
    row["diverged"] = str(meta.get("diverged") or "")
    row["finished"] = str(meta.get("finished") or "")  # UTC ISO 8601; "" in older records
    for k, values in result.get("timings", {}).items():
        row[f"time.{k}"] = float(sum(values))
    return row


def load(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Every stored run of results dir ``root`` as a DataFrame, one row per run.

    Columns: ``run_id``, the configuration fields (``hidden`` as "800-800", plus ``layers``
    and ``tasks``), ``best.<set>`` / ``last.<set>`` (at the highest / the final accuracy on the
    union of all tasks during the final phase; ``best.iteration`` is where), ``best_val.*`` /
    ``last_val.*`` when runs evaluated the validation sets, ``average_accuracy``, ``bwt``,
    ``forgetting``, ``task1`` (the key of the run's task-1 settings, :func:`masq.runid.d1_key`),
    ``after_task1`` (the test accuracies after task 1 joined by "|", which its task-1 state
    alone decides), ``task1_state`` (that state's fingerprint, "" in older records) and
    ``time.*`` in seconds. Curves: :func:`load_result`.
    """
    store = open_store(root)
    rows = [flat_row(check_record(store.run_path(rid))) for rid in sorted(store.listed_ids())]
    return pd.DataFrame(rows)


def load_record(root: str | os.PathLike[str], rid: str) -> dict[str, Any]:
    """The raw stored record of run ``rid`` (its "result" holds the curves)."""
    store = open_store(root)
    if not store.run_path(rid).exists():
        raise ConfigError(f"no run {rid!r} in {str(root)!r}; `masq table` lists the stored runs")
    return check_record(store.run_path(rid))


def load_result(root: str | os.PathLike[str], rid: str) -> Result:
    """Run ``rid`` as a :class:`masq.protocol.Result` (curves included)."""
    from masq.protocol.result import Result

    return Result.from_dict(load_record(root, rid)["result"])


def errors(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The recorded errors of ``root`` (runs that failed and have not since succeeded)."""
    return open_store(root).error_records()
