"""A grid -> its run configurations: the product of the axes, canonicalized, de-duplicated."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from masq.config import (
    FIELD,
    IMPORTANCE_FIELDS,
    RELEVANT_IMPORTANCE_FIELDS,
    Consolidation,
    ImportanceKind,
    RunConfig,
    lam_per_lr2,
)
from masq.grid.spec import AXIS_FIELDS
from masq.store import run_id


def lam_values(grid: Any, lr2: float) -> list[float]:
    """The λ values at re-training rate ``lr2``: ``lam`` then c / lr2 for c in ``lam_per_lr2``."""
    return [float(v) for v in grid.lam] + [lam_per_lr2(c, lr2) for c in grid.lam_per_lr2]


def canonical(config: RunConfig) -> RunConfig:
    """``config`` with the fields that cannot affect its result set to their defaults.

    - λ = 0 (or importance "none") is one run whatever the importance and consolidation:
      importance "none", λ = 0, default importance and consolidation settings;
    - for "masq" the Fisher label source is irrelevant, for "fisher" the MaSQ batch and
      scale (:data:`masq.config.RELEVANT_IMPORTANCE_FIELDS`);
    - with two tasks online EWC is EWC (one anchor, F = F_1), and γ only matters for online
      EWC: both take their defaults where they cannot matter.
    """
    changes: dict[str, Any] = {}
    none = config.lam == 0 or config.importance == ImportanceKind.NONE
    if none:
        changes["lam"] = 0.0
        changes["importance"] = ImportanceKind.NONE
    kind = ImportanceKind.NONE if none else config.importance
    relevant = RELEVANT_IMPORTANCE_FIELDS[kind]
    for name in IMPORTANCE_FIELDS:
        if name != "importance" and name not in relevant:
            changes[name] = FIELD[name].default
    if none or config.n_tasks == 2:
        changes["consolidation"] = Consolidation.EWC
    if changes.get("consolidation", config.consolidation) != Consolidation.ONLINE_EWC:
        changes["gamma"] = FIELD["gamma"].default
    return dataclasses.replace(config, **changes)


# Outer-to-inner order of the product: the runs of one task-1 group stay together.
ORDER: tuple[str, ...] = tuple(
    sorted(
        (f.name for f in AXIS_FIELDS if f.name != "lam"),
        key=lambda n: (
            ("slt", "dataset", "seed", "hidden").index(n)
            if n in ("slt", "dataset", "seed", "hidden")
            else 4 + [f.name for f in AXIS_FIELDS].index(n)
        ),
    )
)


def expand(grid: Any) -> list[RunConfig]:
    """Every configuration of ``grid``: the product of its axes, canonicalized
    (:func:`canonical`), validated and de-duplicated (first occurrence kept).

    The order keeps runs of one task-1 group together: SLT, dataset, seed, architecture, the
    other task-1 fields, then the importance settings, the later-phase settings and λ.
    """
    grid.check()
    seen: set[str] = set()
    configs: list[RunConfig] = []
    for combo in itertools.product(*(getattr(grid, name) for name in ORDER)):
        values = dict(zip(ORDER, combo, strict=True))
        for lam in lam_values(grid, values["lr2"]):
            config = canonical(RunConfig(**values, lam=lam, device=grid.device).validate())
            rid = run_id(config)
            if rid in seen:
                continue
            seen.add(rid)
            configs.append(config)
    return configs
