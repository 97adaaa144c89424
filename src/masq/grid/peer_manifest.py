"""The manifest of a peer preset's runs in a results directory (``peers-NAME.json``).

``masq grid --preset NAME`` records which runs make each cell of the table
(:func:`write_manifest`), with the flags it ran with and the :func:`definition` of the preset,
so that ``masq peers NAME`` tabulates exactly those runs (:func:`table_cells`), and cells of
two flag sets or of two definitions of the preset never mix in one table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from masq.config import RunConfig
from masq.errors import ConfigError
from masq.fileio import atomic_write
from masq.grid.peers import PeerPreset
from masq.grid.tune import expected_runs
from masq.runid import key_of, run_id

MANIFEST_FORMAT = "masq-peers"


def manifest_path(results: str | os.PathLike[str], name: str) -> Path:
    """Where a results directory records the cells of peer preset ``name``."""
    return Path(results) / f"peers-{name}.json"


def definition(preset: PeerPreset) -> str:
    """A fingerprint of what ``preset`` runs as shipped: the hash of its cells' run ids, which
    change with any setting that changes a number (an edited preset gets a new one)."""
    cells = {key: sorted(run_id(c) for c in cs) for key, cs in preset.cells().items()}
    if preset.tune_axes:  # tuning runs apart from the table's: another table
        return key_of({"cells": cells, "tune_seeds": preset.tune_seeds,
                       "tune_axes": dict(preset.tune_axes)})  # fmt: skip
    if preset.tune_seeds:  # the sweeps run on fewer seeds: another table
        return key_of({"cells": cells, "tune_seeds": preset.tune_seeds})
    return key_of(cells)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What ``masq grid --preset NAME`` recorded in a results directory (``peers-NAME.json``)."""

    cells: dict[str, list[str]]  # {cell key: run ids}
    definition: str | None = None  # :func:`definition` of the preset that wrote it
    expected: dict[str, int] | None = None  # {cell key: runs once complete}
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_manifest(results: str | os.PathLike[str], name: str) -> Manifest | None:
    """The manifest of peer preset ``name`` in ``results``, read once; None when ``masq grid
    --preset name`` has not run there; a malformed file is a one-line ConfigError naming it.
    A manifest written before manifests recorded the definition or the expected runs has None
    there (then every recorded run of a cell counts)."""
    path = manifest_path(results, name)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        cells = body["cells"]
        if body.get("format") != MANIFEST_FORMAT or not isinstance(cells, dict):
            raise ValueError("not a masq-peers manifest")
        definition = body.get("definition")
        expected = body.get("expected")
        return Manifest(
            cells={str(k): [str(r) for r in v] for k, v in cells.items()},
            definition=None if definition is None else str(definition),
            expected=None if expected is None else {str(k): int(v) for k, v in expected.items()},
            overrides=dict(body.get("overrides") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path}: malformed peers manifest ({err}); rerun `masq grid --preset {name}` "
            "with the same flags to rewrite it"
        ) from None


def manifest_definition(results: str | os.PathLike[str], name: str) -> str | None:
    """The :func:`definition` of the preset that wrote the manifest of ``name`` in
    ``results`` (None: no manifest, a malformed one, or one written before manifests
    recorded it)."""
    try:
        manifest = load_manifest(results, name)
    except ConfigError:
        return None
    return None if manifest is None else manifest.definition


def write_manifest(
    results: str | os.PathLike[str],
    preset: PeerPreset,
    overrides: Mapping[str, Any],
    cells: Mapping[str, Sequence[RunConfig]],
) -> Path:
    """Record in ``results`` which runs make each cell of ``preset`` (run with
    ``overrides``) and how many runs each has once complete, so that ``masq peers`` tabulates
    exactly them. The cells of an earlier invocation that this one does not run (other rows
    or columns) are kept where that invocation ran the same definition of the preset
    (:func:`definition`: its settings unchanged since) with the same flags (a value of the
    column field only restricts the columns, as ``--rows`` the rows); otherwise its
    cells are another table's (e.g. a grid of more seeds for one cell) and are dropped, so a
    table never mixes cells of two flag sets. A malformed manifest is replaced."""
    current = definition(preset)
    try:
        old = load_manifest(results, preset.name)
    except ConfigError:
        old = None
    settings = {k: v for k, v in overrides.items() if k != preset.field}  # columns: like rows
    flags = json.loads(json.dumps(settings, ensure_ascii=False, default=str))
    same = old is not None and old.definition == current and old.overrides == flags
    earlier = old.cells if old is not None and same else {}
    expected = (old.expected or {}) if old is not None and same else {}
    body = {
        "format": MANIFEST_FORMAT,
        "preset": preset.name,
        "definition": current,
        "overrides": flags,
        "cells": {**earlier, **{key: [run_id(c) for c in cs] for key, cs in cells.items()}},
        "expected": {**expected, **expected_runs(cells, preset.tune_seeds, preset.tune_axes)},
    }
    text = json.dumps(body, indent=1, ensure_ascii=False, default=str)
    return atomic_write(manifest_path(results, preset.name), text + "\n")


def table_cells(
    preset: PeerPreset, manifest: Manifest | None
) -> tuple[dict[str, list[str]], dict[str, int] | None]:
    """({cell key: run ids}, {cell key: runs once complete}) that ``masq peers`` tabulates:
    the manifest's (None for its expected runs where it predates recording them), and the
    preset's shipped runs for every cell no grid ran, where the manifest's grids ran without
    flags (a grid of some ``--rows``: the other cells' runs are the shipped ones); without a
    manifest, the shipped runs of every cell."""
    if manifest is not None and manifest.overrides:
        return dict(manifest.cells), manifest.expected  # with flags: shipped runs are not these
    cells = dict(manifest.cells) if manifest is not None else {}
    missing = {key: cs for key, cs in preset.cells().items() if key not in cells}
    if manifest is not None and not missing:
        return cells, manifest.expected
    cells.update({key: [run_id(c) for c in cs] for key, cs in missing.items()})
    expected = expected_runs(missing, preset.tune_seeds, preset.tune_axes)
    if manifest is None:
        return cells, expected
    earlier = manifest.expected or {key: len(ids) for key, ids in manifest.cells.items()}
    return cells, {**earlier, **expected}


def read_manifest(results: str | os.PathLike[str], name: str) -> dict[str, list[str]] | None:
    """{cell key: run ids} of :func:`load_manifest` (None when there is no manifest)."""
    manifest = load_manifest(results, name)
    return None if manifest is None else manifest.cells


__all__ = [
    "MANIFEST_FORMAT",
    "Manifest",
    "definition",
    "load_manifest",
    "manifest_definition",
    "manifest_path",
    "read_manifest",
    "table_cells",
    "write_manifest",
]
