"""Run ids: the stable hash of a run's configuration, and the short keys of shared work.

A run's id is ``sha256`` of the canonical JSON of its configuration (keys sorted, no spaces,
the RUN fields such as ``device`` left out, fields added since format 1 left out while at their
default), cut to :data:`ID_LENGTH` hex digits: the same configuration always maps to the same
id whatever the order of its keys, ``lam=1000`` and ``lam=1000.0`` are one run, and the ids of
masq 0.1's runs are unchanged. :func:`key_of` hashes any JSON-ready mapping the same way (the
task-1 state and importance cache keys of a grid). Pure functions of configs; no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from masq.config import FIELD, FIRST_FIELDS, LEGACY_ID_VALUES, Choice, Stage

ID_LENGTH = 20


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
    only where they differ from their default; renamed values in their old spelling
    (:data:`masq.config.LEGACY_ID_VALUES`: ``fisher_labels="empirical"`` hashes as "true")."""
    d = config_dict(config)
    out = {}
    for k, v in d.items():
        spec = FIELD.get(k)
        if spec is not None and spec.stage == Stage.RUN:
            continue
        if spec is not None and spec.since_v1 and v == config_dict({k: spec.default})[k]:
            continue
        out[k] = LEGACY_ID_VALUES.get(k, {}).get(v, v) if isinstance(v, str) else v
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


def d1_key(config: Any) -> str:
    """The key of a run's task-1 state (its cache file, the group of runs that share it):
    :func:`key_of` the ``FIRST_FIELDS`` of :func:`id_dict` (those added since store format 1
    only where they differ from their defaults, as in run ids)."""
    d = id_dict(config)
    return key_of({name: d[name] for name in FIRST_FIELDS if name in d})
