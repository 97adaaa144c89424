"""The verified cache: ``<name>.npz`` plus a sidecar ``<name>.json`` holding its SHA-256.

The directory is ``$MASQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/masq``, else
``~/.cache/masq``. The npz is written deterministically (its bytes depend on the arrays
only), both files atomically (:func:`masq.fileio.atomic_write`), the npz first; the
sidecar is checked on every read, and an entry that fails any check is discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from masq.data.dataset import Split
from masq.data.specs import DatasetSpec
from masq.errors import DataError
from masq.fileio import atomic_write

__all__ = ["cache_dir", "discard", "paths", "read", "read_sidecar", "write"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1
_CACHE_KEYS: tuple[str, ...] = ("train_images", "train_labels", "val_images", "val_labels")
_CACHE_KEYS += ("test_images", "test_labels")
_PARTS = ("train", "val", "test")


def cache_dir() -> Path:
    """``$MASQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/masq``, else ``~/.cache/masq``."""
    if os.environ.get("MASQ_CACHE_DIR"):
        return Path(os.environ["MASQ_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "masq"


def paths(name: str) -> tuple[Path, Path]:
    """(npz, sidecar json) of dataset ``name``'s cache entry."""
    root = cache_dir()
    return root / f"{name}.npz", root / f"{name}.json"


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz of ``arrays`` whose bytes depend on the arrays only.

    (``np.savez`` stamps the current time into the zip; here every member gets the
    fixed date 1980-01-01, so equal arrays give equal files and equal SHA-256.)
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in sorted(arrays):
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(arrays[key]))
    return buffer.getvalue()


def _sweep_stale_temps(root: Path, name: str, older_than_s: float = 600.0) -> None:
    """Remove temp files of ``name`` left by a killed writer (never read as cache)."""
    now = time.time()
    for tmp in root.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()


def discard(name: str) -> None:
    """Remove dataset ``name``'s cache entry (both files; absent ones are fine)."""
    for path in paths(name):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write(spec: DatasetSpec, parts: tuple[Split, Split, Split], origin: str) -> str:
    """Store the three parts as ``<name>.npz`` then its sidecar; returns the npz SHA-256."""
    npz_path, json_path = paths(spec.name)
    arrays: dict[str, np.ndarray] = {}
    for part, split in zip(_PARTS, parts, strict=True):
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = split.images, split.labels
    data = _npz_bytes(arrays)
    digest = hashlib.sha256(data).hexdigest()
    sidecar = {
        "format": _CACHE_FORMAT,
        "dataset": spec.name,
        "file": npz_path.name,
        "sha256": digest,
        "bytes": len(data),
        "origin": origin,
        "idx_sha256": dict(spec.idx_sha256),
        "sizes": {p: len(s) for p, s in zip(_PARTS, parts, strict=True)},
    }
    try:
        _sweep_stale_temps(npz_path.parent, spec.name)
        atomic_write(npz_path, data)
        atomic_write(json_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    except OSError as err:
        raise DataError(
            f"cannot write the cache {npz_path} ({err.strerror or err}); "
            "set MASQ_CACHE_DIR to a writable directory"
        ) from None
    return digest


def read_sidecar(spec: DatasetSpec) -> dict[str, Any]:
    """The sidecar of ``spec``'s cache entry; raises ValueError/OSError if unusable."""
    _, json_path = paths(spec.name)
    meta = json.loads(json_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        raise ValueError("unknown sidecar format")
    if meta.get("dataset") != spec.name or meta.get("idx_sha256") != dict(spec.idx_sha256):
        raise ValueError("sidecar describes other data")
    return meta


def read(spec: DatasetSpec) -> tuple[tuple[Split, Split, Split] | None, dict[str, Any], str]:
    """(parts, sidecar, "") from a verified cache entry, or (None, {}, why not).

    An entry that fails a check is logged, discarded, and reported as ``"invalid (...),
    discarded"``.
    """
    npz_path, json_path = paths(spec.name)
    if not npz_path.exists() and not json_path.exists():
        return None, {}, "absent"
    try:
        meta = read_sidecar(spec)
        data = npz_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("sha256 mismatch: corrupted or truncated")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in _CACHE_KEYS}
        parts = cast(
            tuple[Split, Split, Split],  # one per entry of _PARTS
            tuple(Split(arrays[f"{p}_images"], arrays[f"{p}_labels"]) for p in _PARTS),
        )
        for split in parts:
            if split.images.dtype != np.uint8 or split.labels.dtype != np.int64:
                raise ValueError("wrong dtypes")
            if split.images.shape[1:] != (28, 28) or split.images.shape[0] != len(split):
                raise ValueError("wrong shapes")
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        reason = f"invalid ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        log.warning("masq: cache entry %s %s; discarded, fetching again", npz_path, reason)
        discard(spec.name)
        return None, {}, f"{reason}, discarded"
    return parts, meta, ""
