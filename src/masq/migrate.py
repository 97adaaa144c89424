"""``masq migrate``: a results directory of format 1 (masq 0.1, two-task records) converted in
place to format 2 (:mod:`masq.store`), its run ids unchanged."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

from masq.errors import ConfigError
from masq.fileio import LockHeld, atomic_write, exclusive_lock, replace_dir, restore_dir
from masq.store import FORMAT_VERSION, meta_text, read_json, read_meta

# runs/ of format 1 while migrate swaps the converted copy in; the prefix of that copy
MIGRATE_BACKUP, MIGRATE_STAGING = ".runs-v1", ".runs-v2-"


def migrate(root: str | os.PathLike[str]) -> int:
    """Convert results dir ``root`` from format 1 to 2; the number of records converted. Each
    record goes into a copy of runs/ first (one that cannot be converted: a one-line ConfigError
    naming it, the dir left as it was); then, holding DIR/.lock, the copy replaces runs/ and
    meta.json is written (the commit, :func:`masq.fileio.replace_dir`). Interrupted before the
    commit (Ctrl-C: undone at once; ``kill -9``: by the next migrate), the dir stays format 1."""
    root = Path(root)
    meta, runs, backup = root / "meta.json", root / "runs", root / MIGRATE_BACKUP
    if not meta.exists():
        raise ConfigError(f"{str(root)!r} is not a results directory (no meta.json)")
    version = read_meta(meta).get("version")
    if version not in (1, FORMAT_VERSION):
        raise ConfigError(f"results dir {str(root)!r} has unknown format version {version}")
    if version == FORMAT_VERSION:
        _drop_leftovers(root)
        return 0
    staged, count = _stage_v2(backup if backup.exists() else runs, root)  # backup: swap killed
    try:
        with exclusive_lock(root / ".lock"):
            if read_meta(meta).get("version") == FORMAT_VERSION:
                return 0  # converted by another migrate meanwhile
            restore_dir(runs, backup)
            replace_dir(runs, staged, backup, lambda: atomic_write(meta, meta_text()))
            _drop_leftovers(root)
    except LockHeld as err:
        raise ConfigError(
            f"results dir {str(root)!r} is in use by another masq process (pid {err.pid}); "
            "wait for it to end, then run `masq migrate` again"
        ) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return count


def _drop_leftovers(root: Path) -> None:  # of migrations killed
    for leftover in (root / MIGRATE_BACKUP, *root.glob(f"{MIGRATE_STAGING}*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _stage_v2(runs: Path, root: Path) -> tuple[Path, int]:
    """(a new hidden dir in ``root`` with the records of ``runs`` in format 2, the number
    converted); other files are copied as they are, temporary ones left out. A record that
    cannot be converted: a one-line ConfigError naming it (the copy removed)."""
    from masq.protocol.result import result_from_v1

    staged, count = Path(tempfile.mkdtemp(prefix=MIGRATE_STAGING, dir=root)), 0
    try:
        os.chmod(staged, runs.stat().st_mode & 0o7777 if runs.is_dir() else 0o755)
        for path in sorted(runs.iterdir()) if runs.is_dir() else []:
            if path.name.startswith("."):
                continue  # a temporary file of an interrupted write
            record = read_json(path) if path.suffix == ".json" else {"version": FORMAT_VERSION}
            if record.get("version") == FORMAT_VERSION:  # or not a record: copied
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, staged / path.name)
                continue
            try:
                result = result_from_v1(cast(Any, record["result"]))  # JSON; a bad one raises
                new = {"run_id": record["run_id"], "version": FORMAT_VERSION, "result": result}
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                what = f"no {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
                raise ConfigError(
                    f"{path}: not a masq 0.1 record that can be converted ({what}); the results "
                    "dir was left as it was: fix or move that record, then run `masq migrate` again"
                ) from None
            atomic_write(staged / path.name, json.dumps(new, ensure_ascii=False) + "\n")
            count += 1
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged, count


__all__ = ["MIGRATE_BACKUP", "MIGRATE_STAGING", "migrate"]
