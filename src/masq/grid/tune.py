"""A λ sweep's runs split into tuning runs and table runs (the ``tune_seeds`` and
``tune_axes`` of a peer preset, :mod:`masq.grid.peers`; ``masq analyze kfac --tune-seeds``).

A sweep chooses its λ on the validation sets of its tuning runs; of its held runs (the table
runs still to come) only those at that λ run, once the tuning runs are stored
(:func:`held_at_chosen`). Pure functions of run configurations and run ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, TypeVar

from masq.config import RunConfig
from masq.runid import run_id

K = TypeVar("K")


def matches(config: RunConfig | Mapping[str, Any], tune_axes: Mapping[str, Any]) -> bool:
    """Whether ``config`` (a run configuration, or one stored run's values by field name) has
    every value of ``tune_axes`` (fields of a run configuration)."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key)
    return all(get(key) == value for key, value in tune_axes.items())


def tuning_split(
    configs: Sequence[RunConfig], tune_seeds: int, tune_axes: Mapping[str, Any] | None = None
) -> tuple[list[RunConfig], list[RunConfig]]:
    """(tuning runs, held runs) of one cell. A cell with one λ is all tuning runs, with no
    held ones. A λ sweep (two or more λ) chooses its λ on the validation sets of its tuning
    runs; of its held runs only those at that λ are run:

    - without ``tune_axes``: the tuning runs are those of its ``tune_seeds`` smallest seeds
      (every seed for 0) and the held runs those of the other seeds; a tuning run at the
      chosen λ is also a table run;
    - with ``tune_axes`` (:meth:`masq.grid.peers.PeerPreset.cells` adds the tuned
      configurations): the tuning runs are those of the tuning seeds that have the
      ``tune_axes`` values, and the held runs every other one, the tuning seeds included: the
      table runs. Where no run lacks those values (the cell's own values are the tuned
      ones), as without them."""
    seeds = sorted({c.seed for c in configs})
    if len({c.lam for c in configs}) < 2:
        return list(configs), []
    tuning_seeds = set(seeds[:tune_seeds] if tune_seeds > 0 else seeds)
    table = [c for c in configs if not matches(c, tune_axes or {})]
    if table:
        return [c for c in configs if c.seed in tuning_seeds and matches(c, tune_axes or {})], table
    if len(tuning_seeds) == len(seeds):
        return list(configs), []
    return [c for c in configs if c.seed in tuning_seeds], [
        c for c in configs if c.seed not in tuning_seeds
    ]


def held_at_chosen(
    sweeps: Mapping[K, tuple[Sequence[RunConfig], Sequence[RunConfig]]],
    stored: Set[str],
    choose: Callable[[K, list[str]], float],
) -> tuple[list[RunConfig], int]:
    """(runs, sweeps waiting): for every sweep ``key: (tuning runs, held runs)`` of
    :func:`tuning_split` with held runs whose tuning runs' ids are all in ``stored``, the held
    runs at λ = ``choose(key, tuning ids)`` (the λ chosen on their validation sets); and how
    many such sweeps still wait for tuning runs to be stored."""
    out: list[RunConfig] = []
    waiting = 0
    for key, (tuning, held) in sweeps.items():
        if not held:
            continue
        ids = list(dict.fromkeys(run_id(c) for c in tuning))
        if not set(ids) <= stored:
            waiting += 1
            continue
        lam = choose(key, ids)
        out += [c for c in held if c.lam == lam]
    return out, waiting


def expected_runs(
    cells: Mapping[str, Sequence[RunConfig]],
    tune_seeds: int,
    tune_axes: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """{cell key: the runs the cell has once complete}: its tuning runs (distinct ids) and one
    run per held seed (:func:`tuning_split`)."""
    out = {}
    for key, configs in cells.items():
        tuning, held = tuning_split(configs, tune_seeds, tune_axes)
        out[key] = len({run_id(c) for c in tuning}) + len({c.seed for c in held})
    return out


def held_count(
    cells: Mapping[str, Sequence[RunConfig]],
    tune_seeds: int,
    tune_axes: Mapping[str, Any] | None = None,
) -> int:
    """How many runs the cells' held seeds add once their sweeps have chosen λ: one per held
    seed of each cell (:func:`tuning_split`)."""
    return sum(
        len({c.seed for c in tuning_split(cs, tune_seeds, tune_axes)[1]}) for cs in cells.values()
    )


__all__ = ["expected_runs", "held_at_chosen", "held_count", "matches", "tuning_split"]
