"""A compact, committable copy of a results directory's run records: one gzip JSON Lines file.

:func:`export_records` writes every valid record of ``DIR/runs/`` (:mod:`masq.store`) as one
line each, sorted by run id, into ``FILE.jsonl.gz``: each line is the record as the store
writes it (``json.dumps(record, ensure_ascii=False)``), the file is compressed with gzip
``mtime = 0``, so exporting the same records twice gives the same bytes (a diff of the
committed file changes only when a record does). :func:`import_records` restores the records
into a results directory (created with its ``meta.json`` if needed): every line is validated
as the store validates a record (:func:`masq.store.check_record`) before anything is
written, run ids already stored are skipped, and each record is written atomically, so that
``DIR/runs/<id>.json`` is byte for byte the file the store wrote; it holds the results dir's
lock (``DIR/.lock``) as a grid does, so that two writers never fill one directory at once.
Cached task-1 states and importances are not part of the archive (a grid recomputes them when
it needs them).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masq.errors import ConfigError
from masq.fileio import LockHeld, atomic_write, error_text, exclusive_lock, warn
from masq.store import InvalidRecord, Store, check_record, open_store

SUFFIX = ".jsonl.gz"


@dataclass(frozen=True)
class Imported:
    """What :func:`import_records` did: records written now and records already stored."""

    written: int
    skipped: int


def record_line(record: dict[str, Any]) -> str:
    """One archive line: the record as :meth:`masq.store.Store.write_result` writes it, less
    its final newline."""
    return json.dumps(record, ensure_ascii=False)


def export_records(results_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> int:
    """Write every valid run record of ``results_dir`` into the gzip JSON Lines file ``path``
    (sorted by run id, gzip mtime 0: identical records give identical bytes), atomically;
    the number of records. Invalid records are left out with a warning (nothing is moved)."""
    store = open_store(results_dir)
    lines = []
    for rid in sorted(store.listed_ids()):
        try:
            record = check_record(store.run_path(rid))
        except InvalidRecord as err:
            warn(f"{err.path} left out of the archive ({err.reason})")
            continue
        lines.append(record_line(record) + "\n")
    payload = gzip.compress("".join(lines).encode("utf-8"), compresslevel=9, mtime=0)
    try:
        atomic_write(path, payload)
    except OSError as err:
        raise ConfigError(f"--to {str(path)!r}: cannot write ({error_text(err)})") from None
    return len(lines)


def _damaged(path: Path, reason: str) -> ConfigError:
    reason = " ".join(reason.split())
    return ConfigError(f"{path}: damaged record archive ({reason}); export it again")


def read_archive(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The (run id, record text) pairs of the archive ``path``, each record validated like a
    stored one (:func:`masq.store.check_record`); a missing file or a damaged one (bad gzip,
    not UTF-8, a line that is not a valid record, a run id twice) is a one-line ConfigError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--from {str(path)!r}: no such file; give a {SUFFIX} of `masq export`")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from None
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rid = json.loads(line).get("run_id")
        except (ValueError, AttributeError) as err:
            raise _damaged(path, f"line {number} is not a JSON object: {err}") from None
        if not isinstance(rid, str) or not rid.isalnum() or rid in seen:
            raise _damaged(path, f"line {number} has a bad or repeated run_id {rid!r}")
        try:
            check_record(Path(f"{rid}.json"), line)  # as if stored under its run id
        except InvalidRecord as err:
            raise _damaged(path, f"line {number}: {err.reason}") from None
        seen.add(rid)
        out.append((rid, line + "\n"))
    return out


def import_records(path: str | os.PathLike[str], results_dir: str | os.PathLike[str]) -> Imported:
    """Restore the records of the archive ``path`` into ``results_dir`` (created with its
    meta.json if needed), skipping run ids already stored with a valid record; nothing is
    written when any line of the archive is damaged (:func:`read_archive`). Holds DIR/.lock
    as a grid does (another holder: a one-line ConfigError naming it and its process); a
    record that cannot be written (disk full) stops the import with a one-line ConfigError
    naming the file (the records written before it stay: a re-run skips them)."""
    records = read_archive(path)
    store = Store(results_dir)
    store.check_writable()
    lock = store.root / ".lock"
    written = skipped = 0
    try:
        with exclusive_lock(lock):
            for rid, text in records:
                if store.has(rid):
                    skipped += 1
                    continue
                _write(store.run_path(rid), text, written, len(records))
                written += 1
    except LockHeld as err:
        raise ConfigError(
            f"results dir {str(store.root)!r} is in use: {lock} is held by process "
            f"{err.pid if err.pid is not None else '?'}; wait for it to end, then run "
            "`masq import` again"
        ) from None
    return Imported(written, skipped)


def _write(target: Path, text: str, written: int, total: int) -> None:
    """Write one imported record atomically; a failure is a one-line ConfigError naming it."""
    try:
        atomic_write(target, text)
    except OSError as err:
        raise ConfigError(
            f"could not write {target} ({error_text(err)}); {written} of {total} record(s) "
            "were imported before it: once fixed, run `masq import` again (it skips those)"
        ) from None
