"""``load`` and ``info``: the sources tried in order, down to a :class:`Dataset`.

The order is: the user's data dir, the cache, the mirrors, the offline fallback (see
:mod:`masq.data`). Other submodules are reached through their module objects
(``sources.download``, ``cache.read``), so a test that replaces one of their functions
in its home module is seen here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from masq.data import cache, sources
from masq.data.dataset import Dataset, Split, classic_split
from masq.data.idx import IDX_NAMES
from masq.data.specs import DatasetSpec, get_spec
from masq.errors import ChecksumError, DataError

__all__ = ["info", "load", "source_order"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _no_source(spec: DatasetSpec, tried: list[tuple[str, str, bool]]) -> DataError:
    listing = "; ".join(f"{source}: {_one_line(why)}" for source, why, _ in tried)
    error = ChecksumError if any(bad for _, _, bad in tried) else DataError
    return error(
        f"no source of {spec.name} could be used ({listing}). Fix: give --data-dir DIR holding "
        f"{', '.join(f'{n}[.gz]' for n in IDX_NAMES)} (or set MASQ_DATA_DIR=DIR), "
        "or connect to the internet and retry"
    )


def _finish(spec: DatasetSpec, parts: tuple[Split, Split, Split], source: str) -> Dataset:
    train, val, test = parts
    return Dataset(name=spec.name, train=train, val=val, test=test, source=source)


def load(
    name: str = "mnist",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Dataset:
    """The classic split of ``name``: val = training file[:5000], train = [5000:], test.

    Images uint8 [N, 28, 28], labels int64 [N], in the files' order. Sources are
    tried in the order of the :mod:`masq.data` docstring; ``Dataset.source`` names the
    one used. A named directory (``data_dir``, else a non-empty ``$MASQ_DATA_DIR``) that is
    missing, lacks the files or holds bad ones is an error, not skipped; so is having no
    usable source (the message lists what was tried).
    """
    spec = get_spec(name)
    tried: list[tuple[str, str, bool]] = []
    directory = data_dir if data_dir is not None else os.environ.get("MASQ_DATA_DIR") or None
    if directory is not None:
        directory = Path(directory).expanduser()
        files, why = sources.find_idx_files(directory, spec.name)
        if files is None:  # a named directory without the files is an error, never skipped
            if data_dir is not None:
                raise DataError(
                    f"--data-dir: {why}; give the directory that holds the four {spec.name} "
                    "IDX files (or a sub-directory named after the dataset)"
                )
            raise DataError(
                f"MASQ_DATA_DIR: {why}; set it to the directory that holds the four "
                f"{spec.name} IDX files (or a sub-directory named after the dataset), or unset "
                "it to use the cache and the download"
            )
        raw = sources.read_idx_dir(spec, files)
        parts = classic_split(raw, spec.n_val)
        source = f"data dir {files[IDX_NAMES[0]].parent} (IDX files)"
        if cache.read(spec)[0] is None:
            cache.write(spec, parts, source)
        return _finish(spec, parts, source)
    tried.append(("data dir", "not given", False))

    cached, meta, why = cache.read(spec)
    npz_path, _ = cache.paths(spec.name)
    if cached is not None:
        return _finish(spec, cached, f"cache {npz_path} (from {meta.get('origin', '?')})")
    tried.append((f"cache {npz_path}", why, False))

    for label, fetch in (("download", sources.download), (spec.offline, sources.offline)):
        try:
            raw, source = fetch(spec, progress)
        except DataError as err:
            tried.append((label, str(err), isinstance(err, ChecksumError)))
            continue
        parts = classic_split(raw, spec.n_val)
        cache.write(spec, parts, source)
        return _finish(spec, parts, source)
    raise _no_source(spec, tried)


def source_order(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The sources ``load(name)`` tries, in order, as one line each."""
    spec = get_spec(name)
    directory = data_dir if data_dir is not None else os.environ.get("MASQ_DATA_DIR")
    return [
        f"data dir: {directory}" if directory else "data dir: (none: --data-dir / MASQ_DATA_DIR)",
        f"cache: {cache.paths(spec.name)[0]}",
        f"download: {', '.join(spec.mirrors)}",
        f"offline: {spec.offline}",
    ]


def info(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Facts about ``name`` (loading it, so fetching it if needed): sizes, class counts
    per split, source, the cached npz's path and SHA-256, and the source order."""
    dataset = load(name, data_dir=data_dir, progress=progress)
    spec = get_spec(name)
    npz_path, _ = cache.paths(spec.name)
    try:
        meta = cache.read_sidecar(spec)
    except (OSError, ValueError):
        meta = {}
    splits = dataset.splits()
    return {
        "dataset": dataset.name,
        "source": dataset.source,
        "origin": meta.get("origin"),
        "cache_path": str(npz_path),
        "sha256": meta.get("sha256"),
        "bytes": meta.get("bytes"),
        "num_classes": dataset.num_classes,
        "sizes": {part: len(split) for part, split in splits.items()},
        "class_counts": {
            part: split.class_counts(dataset.num_classes).tolist() for part, split in splits.items()
        },
        "sources": source_order(name, data_dir),
    }
