"""A grid -> its run configurations: the product of the axes, canonicalized, de-duplicated."""

from __future__ import annotations

import itertools
from typing import Any

from masq.config import RunConfig, lam_per_lr2
from masq.consolidation import canonical, check_config
from masq.grid.spec import AXIS_FIELDS
from masq.runid import run_id


def lam_values(grid: Any, lr2: float) -> list[float]:
    """The λ values at re-training rate ``lr2``: ``lam`` then c / lr2 for c in ``lam_per_lr2``."""
    return [float(v) for v in grid.lam] + [lam_per_lr2(c, lr2) for c in grid.lam_per_lr2]


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
    """Every configuration of ``grid``: the product of its axes, checked
    (:func:`masq.consolidation.check_config`: registered measure and method), canonicalized
    (:func:`masq.consolidation.canonical`: fields its measure and method do not read at their
    defaults) and de-duplicated (first occurrence kept).

    The order keeps runs of one task-1 group together: SLT, dataset, seed, architecture, the
    other task-1 fields, then the importance settings, the later-phase settings and λ.
    """
    grid.check()
    seen: set[str] = set()
    configs: list[RunConfig] = []
    for combo in itertools.product(*(getattr(grid, name) for name in ORDER)):
        values = dict(zip(ORDER, combo, strict=True))
        for lam in lam_values(grid, values["lr2"]):
            config = canonical(check_config(RunConfig(**values, lam=lam, device=grid.device)))
            rid = run_id(config)
            if rid in seen:
                continue
            seen.add(rid)
            configs.append(config)
    return configs
