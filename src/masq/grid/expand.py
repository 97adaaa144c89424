"""A grid -> its run configurations: the product of the axes, canonicalized, de-duplicated."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from masq.config import (
    FIELD,
    IMM_METHODS,
    IMPORTANCE_FIELDS,
    RELEVANT_IMPORTANCE_FIELDS,
    Consolidation,
    ImportanceKind,
    RunConfig,
    Transfer,
    lam_per_lr2,
)
from masq.grid.spec import AXIS_FIELDS
from masq.runid import run_id


def lam_values(grid: Any, lr2: float) -> list[float]:
    """The λ values at re-training rate ``lr2``: ``lam`` then c / lr2 for c in ``lam_per_lr2``."""
    return [float(v) for v in grid.lam] + [lam_per_lr2(c, lr2) for c in grid.lam_per_lr2]


# The fields only IMM uses (EWC runs hold their defaults).
IMM_FIELDS: tuple[str, ...] = ("transfer", "transfer_lam", "drop_p", "alpha_step")


def canonical(config: RunConfig) -> RunConfig:
    """``config`` with the fields that cannot affect its result set to their defaults.

    - λ = 0 (or importance "none") is one run whatever the importance and consolidation:
      importance "none", λ = 0, default importance and consolidation settings;
    - for "masq" the Fisher label source is irrelevant, for "fisher" the MaSQ batch and
      scale (:data:`masq.config.RELEVANT_IMPORTANCE_FIELDS`);
    - with two tasks online EWC is EWC (one anchor, F = F_1), and γ only matters for online
      EWC: both take their defaults where they cannot matter;
    - the IMM fields (transfer, transfer_lam, drop_p, alpha_step) are EWC's defaults; an IMM
      run (mean-imm, mode-imm: :func:`canonical_imm`) has EWC's λ and γ at their defaults.
    """
    if config.consolidation in IMM_METHODS:
        return canonical_imm(config)
    changes: dict[str, Any] = {name: FIELD[name].default for name in IMM_FIELDS}
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


def canonical_imm(config: RunConfig) -> RunConfig:
    """An IMM run with the fields that cannot affect it at their defaults: λ and γ (EWC's);
    for mean-IMM every importance field (importance "none": it merges without one); the
    importance fields the kind does not use; transfer_lam unless L2-transfer, drop_p unless
    drop-transfer."""
    changes: dict[str, Any] = {"lam": FIELD["lam"].default, "gamma": FIELD["gamma"].default}
    kind = config.importance
    if config.consolidation == Consolidation.MEAN_IMM:
        kind = changes["importance"] = ImportanceKind.NONE
    for name in IMPORTANCE_FIELDS:
        if name != "importance" and name not in RELEVANT_IMPORTANCE_FIELDS[kind]:
            changes[name] = FIELD[name].default
    if config.transfer not in (Transfer.L2, Transfer.L2_DROP):
        changes["transfer_lam"] = FIELD["transfer_lam"].default
    if config.transfer not in (Transfer.DROP, Transfer.L2_DROP):
        changes["drop_p"] = FIELD["drop_p"].default
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
