"""Grids (the paper's §5.1): values per axis, from presets, TOML files and flags.

Every configuration field except the RUN ones (:data:`masq.config.FIELDS`) is an axis of the
same name; in addition ``lam_per_lr2`` (values c giving λ = c / ε2, the other reading of the
paper's λ) and ``device`` (one value, not an axis). TOML keys are the axis names
plus ``seeds`` (a count N: seeds 0..N-1), ``layers`` and ``sizes`` (every architecture with
that many hidden layers of those sizes, instead of ``hidden``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from masq.config import (
    FIELDS,
    AdamState,
    ClassOrder,
    ClassUnits,
    EvalSchedule,
    FieldSpec,
    FisherLabels,
    Init,
    Precision,
    Scale,
    Scenario,
    SIGradient,
    Stage,
    Transfer,
    check_registered,
    check_value,
    coerce,
    parse_hidden,
)
from masq.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AXIS_FIELDS: tuple[FieldSpec, ...] = tuple(f for f in FIELDS if f.stage != Stage.RUN)
LAM_AXES: tuple[str, ...] = ("lam", "lam_per_lr2")
# The most combinations a grid may have: the paper's grid has 576 runs (12.9 h on 2 cores);
# a million runs of even a second each are eleven days, and expanding them holds a config per
# run in memory, so a larger grid (1e9 cells from a typo) is refused before it is expanded.
MAX_GRID_CELLS = 1_000_000


def architecture_count(layers: Iterable[int], sizes: Iterable[int]) -> int:
    """How many nets :func:`architectures` gives, counted without building them; a one-line
    ConfigError when that (or a net's depth) is above :data:`MAX_GRID_CELLS`."""
    k = len(tuple(sizes))
    total = 0
    for n in (int(v) for v in layers):
        big = n > MAX_GRID_CELLS or (k > 1 and n * math.log10(k) > math.log10(MAX_GRID_CELLS))
        total += MAX_GRID_CELLS + 1 if big else k**n
        if total > MAX_GRID_CELLS:
            raise ConfigError(
                f"grid: --layers {n} with {k} --sizes gives more than {MAX_GRID_CELLS:,} "
                "architectures (or layers per net); give fewer layers or sizes"
            )
    return total


def architectures(layers: Iterable[int], sizes: Iterable[int]) -> tuple[tuple[int, ...], ...]:
    """Every net with L in ``layers`` hidden layers, each of a size in ``sizes`` independently.

    ``architectures((2, 3), (200, 400, 800))`` has 3^2 + 3^3 = 36 entries. At most
    :data:`MAX_GRID_CELLS` (:func:`architecture_count`, checked before any is built).
    """
    sizes, layers = tuple(sizes), tuple(layers)
    architecture_count(layers, sizes)
    return tuple(arch for n in layers for arch in itertools.product(sizes, repeat=int(n)))


@dataclasses.dataclass(frozen=True)
class Grid:
    """Values per axis; the grid is their product (:func:`masq.grid.expand`). One axis per
    configuration field (named like it, :data:`AXIS_FIELDS`; ``tests/test_grid.py`` checks
    that they match), plus ``lam_per_lr2`` (values c giving λ = c / ε2) and ``device`` (one
    value, not an axis). The defaults are one run with RunConfig's defaults; the paper's grid
    is the preset ``paper``."""

    slt: tuple[str, ...] = ("D5-5",)
    dataset: tuple[str, ...] = ("mnist",)
    scenario: tuple[Scenario, ...] = (Scenario.CLASS,)
    seed: tuple[int, ...] = (0,)
    class_order: tuple[ClassOrder, ...] = (ClassOrder.FIXED,)
    pad: tuple[int, ...] = (0,)
    permute_first: tuple[bool, ...] = (False,)
    train_on_val: tuple[bool, ...] = (False,)
    hidden: tuple[tuple[int, ...], ...] = ((800, 800),)
    init: tuple[Init, ...] = (Init.TORCH,)
    lr1: tuple[float, ...] = (0.001,)
    iters1: tuple[int, ...] = (5000,)
    batch_size: tuple[int, ...] = (100,)
    adam_state: tuple[AdamState, ...] = (AdamState.RESET,)
    class_units: tuple[ClassUnits, ...] = (ClassUnits.ALL,)
    eval_every: tuple[int, ...] = (250,)
    eval_val: tuple[bool, ...] = (False,)
    eval_schedule: tuple[EvalSchedule, ...] = (EvalSchedule.EVERY,)
    precision: tuple[Precision, ...] = (Precision.FP32,)
    importance: tuple[str, ...] = ("masq",)
    masq_batch: tuple[int, ...] = (1000,)
    scale: tuple[Scale, ...] = (Scale.MEAN,)
    fisher_labels: tuple[FisherLabels, ...] = (FisherLabels.EMPIRICAL,)
    fisher_samples: tuple[int, ...] = (0,)
    si_damping: tuple[float, ...] = (0.1,)
    si_gradient: tuple[SIGradient, ...] = (SIGradient.TASK,)
    consolidation: tuple[str, ...] = ("ewc",)
    gamma: tuple[float, ...] = (1.0,)
    transfer: tuple[Transfer, ...] = (Transfer.WEIGHT,)
    transfer_lam: tuple[float, ...] = (0.001,)
    drop_p: tuple[float, ...] = (0.5,)
    alpha_step: tuple[float, ...] = (0.01,)
    lr2: tuple[float, ...] = (1e-05,)
    lam: tuple[float, ...] = (1000.0,)
    iters2: tuple[int, ...] = (5000,)
    lam_per_lr2: tuple[float, ...] = ()
    device: str = "cpu"

    def axes(self) -> dict[str, tuple[Any, ...]]:
        """{axis name: values} for every axis (``device`` is not an axis)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "device"
        }

    def check(self) -> Grid:
        """Raise ConfigError for an empty axis (λ: both readings empty) or a value out of its
        field's range (:func:`check_axis_value`: NaN, inf, λ < 0, ...); else self."""
        for name, values in self.axes().items():
            if name not in LAM_AXES and len(values) == 0:
                raise ConfigError(f"grid axis {name!r} is empty; give at least one value")
            for value in values:
                check_axis_value(name, value, "grid")
        if not self.lam and not self.lam_per_lr2:
            raise ConfigError("grid axis 'lam' is empty; give --lam and/or --lam-per-lr2 values")
        check_grid_size(self)
        return self

    def size(self) -> int:
        """The number of combinations before de-duplication: the product of the axes' lengths
        (the λ axis counts ``len(lam) + len(lam_per_lr2)``)."""
        axes = self.axes()
        n_lam = len(axes.pop("lam")) + len(axes.pop("lam_per_lr2"))
        return n_lam * math.prod(len(v) for v in axes.values())


def check_grid_size(grid: Grid) -> int:
    """:meth:`Grid.size`; a one-line ConfigError naming the largest axes when it is above
    :data:`MAX_GRID_CELLS` (before anything is expanded)."""
    n = grid.size()
    if n > MAX_GRID_CELLS:
        axes = grid.axes()
        axes["lam"] = (*axes.pop("lam"), *axes.pop("lam_per_lr2"))
        largest = sorted((kv for kv in axes.items() if len(kv[1]) > 1), key=lambda kv: -len(kv[1]))
        named = " × ".join(f"{len(v):,} {k}" for k, v in largest[:3])
        named += " × ..." if len(largest) > 3 else ""
        raise ConfigError(
            f"grid: {n:,} combinations ({named}), above the limit of {MAX_GRID_CELLS:,}; "
            "give fewer values on those axes or split the grid into several"
        )
    return n


GRID_KEYS: tuple[str, ...] = (*(f.name for f in dataclasses.fields(Grid)), "seeds", "layers",
                              "sizes")  # fmt: skip
_SPEC = {f.name: f for f in AXIS_FIELDS}


def check_axis_value(name: str, value: Any, where: str) -> None:
    """A one-line ConfigError unless the number ``value`` of axis ``name`` is in its field's
    range (:func:`masq.config.check_value`: finite, > 0, >= 0 or in [0, 1]); ``lam_per_lr2``:
    finite and >= 0. Other axes (choices, architectures, strings) pass."""
    if name == "lam_per_lr2":
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ConfigError(
                f"{where}: lam_per_lr2: must be a finite number >= 0 (λ = c / ε2), got {value!r}"
            )
        return
    spec = _SPEC.get(name)
    if spec is not None and spec.kind in (int, float):
        check_value(spec, value, f"{where}: ")


def _element(spec: FieldSpec | None, value: Any, key: str, where: str) -> Any:
    if spec is None:  # lam_per_lr2: numbers
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: grid key {key!r} takes numbers, got {value!r}")
        check_axis_value("lam_per_lr2", float(value), where)
        return float(value)
    if spec.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: grid key {key!r} takes int values, got {value!r}")
    if spec.kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: grid key {key!r} takes str values, got {value!r}")
    if spec.kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{where}: grid key {key!r} takes float values, got {value!r}")
    if spec.kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: grid key {key!r} takes bool values, got {value!r}")
    value = coerce(spec, value, f"{where}: ")
    check_registered(spec, value, f"{where}: ")
    check_axis_value(spec.name, value, where)
    return value


def _values(value: Any, key: str, where: str) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if len(values) == 0 and key not in LAM_AXES:
        raise ConfigError(f"{where}: grid axis {key!r} is empty; give at least one value")
    return values


def grid_from_mapping(values: Mapping[str, Any], base: Any = None, where: str = "grid") -> Any:
    """``base`` (default ``Grid()``) with the axes named in ``values`` replaced.

    Keys: every Grid field, plus ``seeds`` (an int N: seeds 0..N-1, or a list), ``layers`` and
    ``sizes``. A scalar is a one-value axis. Giving ``lam`` or ``lam_per_lr2`` replaces both λ
    readings of ``base``. Unknown keys, empty axes and values of the wrong type are
    ConfigErrors.
    """
    base = Grid() if base is None else base
    unknown = sorted(set(values) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown grid key {unknown[0]!r}; known keys: {', '.join(GRID_KEYS)}"
        )
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("hidden", "layers", "sizes", "seeds", "device"):
            continue
        spec = _SPEC.get(key)
        changes[key] = tuple(_element(spec, v, key, where) for v in _values(value, key, where))
    if "seeds" in values:
        if "seed" in values:
            raise ConfigError(
                f"{where}: give either 'seeds' (a count) or 'seed' (a list), not both"
            )
        seeds = values["seeds"]
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds <= 0:
                raise ConfigError(f"{where}: 'seeds' must be a positive count, got {seeds}")
            if seeds > MAX_GRID_CELLS:
                raise ConfigError(
                    f"{where}: 'seeds' (--seeds) {seeds:,} is above the grid limit of "
                    f"{MAX_GRID_CELLS:,} runs; give fewer seeds"
                )
            changes["seed"] = tuple(range(seeds))
        else:
            vals = _values(seeds, "seeds", where)
            changes["seed"] = tuple(_element(_SPEC["seed"], v, "seeds", where) for v in vals)
    if "hidden" in values and ("layers" in values or "sizes" in values):
        raise ConfigError(f"{where}: give either 'hidden' or 'layers' + 'sizes', not both")
    if "hidden" in values:
        archs = _values(values["hidden"], "hidden", where)
        if archs and all(isinstance(a, int) for a in archs):
            archs = [archs]  # hidden = [800, 800]: one architecture
        changes["hidden"] = tuple(parse_hidden(a, f"{where}: 'hidden'") for a in archs)
    elif "layers" in values or "sizes" in values:
        layers = _values(
            values.get("layers", sorted({len(h) for h in base.hidden})), "layers", where
        )
        sizes = _values(
            values.get("sizes", sorted({s for h in base.hidden for s in h})), "sizes", where
        )
        for name, vals in (("layers", layers), ("sizes", sizes)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in vals):
                raise ConfigError(f"{where}: '{name}' must be positive integers, got {vals}")
        changes["hidden"] = architectures(layers, sizes)
    if "device" in values:
        if not isinstance(values["device"], str):
            raise ConfigError(f"{where}: 'device' takes one string, e.g. \"cpu\"")
        changes["device"] = values["device"]
    if ("lam" in changes) != ("lam_per_lr2" in changes):
        other = "lam_per_lr2" if "lam" in changes else "lam"
        changes[other] = ()
    return dataclasses.replace(base, **changes).check()


def toml_values(data: bytes, where: str) -> dict[str, Any]:
    """The TOML document ``data`` (the bytes of a file) as a dict; bytes that are not UTF-8
    text or not TOML are a one-line ConfigError starting with ``where``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: malformed TOML: {err}") from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable, non-UTF-8 or malformed file is a one-line
    ConfigError naming it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"grid file {str(p)!r}: cannot read it ({err.strerror})") from None
    return toml_values(data, f"grid file {str(p)!r}")


def load_grid_file(path: str | os.PathLike[str], base: Any = None) -> Any:
    """``base`` with the axes of TOML grid file ``path`` (keys as :func:`grid_from_mapping`)."""
    return grid_from_mapping(read_toml(path), base, where=str(path))


def list_presets() -> list[str]:
    """The names of the grid presets shipped with masq (``masq grid --preset NAME``)."""
    folder = resources.files("masq").joinpath("presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> Any:
    """The grid of preset ``name`` (e.g. "paper": the paper's §5.1); unknown: ConfigError."""
    names = list_presets()
    if name not in names:
        folder = resources.files("masq").joinpath("presets", "peers")
        tables = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))
        raise ConfigError(
            f"unknown preset {name!r}; available presets: {', '.join(names)}; published "
            f"tables (masq peers): {', '.join(tables)}"
        )
    resource = resources.files("masq").joinpath("presets", f"{name}.toml")
    values = toml_values(resource.read_bytes(), f"preset {name}")
    return grid_from_mapping(values, Grid(), where=f"preset {name}")
