"""Peer presets: the runs behind a published table, row by row and column by column.

A peer preset (``presets/peers/NAME.toml``, run with ``masq grid --preset NAME`` and tabulated
with ``masq peers NAME``) states one table of a publication:

- ``name``, ``title``, ``citation``, ``source`` (where in the publication the numbers are),
  ``statistic`` (what a cell is) and ``spread`` (what its ± is, e.g. "SEM over 5 seeds");
- ``[columns]``: the grid field the table's columns vary (``field``, e.g. "scenario"), its
  ``values``, the publication's ``labels`` for them and, optionally, ``axes.<value>``: grid
  keys of every row in that column (e.g. ``class_units = "seen"`` for the class-incremental
  column only);
- ``[axes]``: the grid keys every cell shares (those of a grid file: ``slt``, ``hidden``,
  ``seeds``, ...);
- one ``[[rows]]`` per method: ``name`` (the publication's label), ``[rows.axes]`` (its grid
  keys), ``[rows.columns.<value>]`` (keys of one column only: the publication's
  hyper-parameters per scenario), ``published.<value> = [mean, spread]`` (in %; ``[mean]``
  where the publication gives no spread; a column without it is ours only) and ``note``;
- ``reference`` (optional): the row every other row is compared with, paired by seed;
- ``tune_seeds`` (optional, default 0: every seed sweeps): a λ sweep runs on the first
  ``tune_seeds`` seeds of its cell only (the tuning seeds); its λ is chosen on their
  validation sets, and the cell's other seeds run at that λ alone
  (:func:`~masq.grid.tune.tuning_split`; ``masq grid --preset`` runs them once the tuning
  sweep is stored);
- ``tune_axes`` (optional): grid keys (fields of a run's configuration, one value each) that
  a λ sweep's tuning runs take and its table runs do not, e.g. ``{ train_on_val = false }``
  where the publication trains on every image but a sweep must choose λ on images it did not
  fit. A sweep cell then has tuning runs (its tuning seeds at every λ, with ``tune_axes``)
  and table runs (every seed, the tuning seeds included, at the chosen λ, without them): the
  table's mean and paired tests read the table runs alone.

A cell's grid is ``axes``, then the column's ``columns.axes``, then the row's axes, then the
row's column keys, then the column's own value, then ``overrides`` (the command line: e.g.
fewer iterations for a test). A cell whose λ axis has several values is a sweep: its λ is
chosen on the validation sets when the table is made (:mod:`masq.analysis.peers`). The
preset's runs are the union of its cells' runs, de-duplicated by run id (cells that share a
configuration share its run). The record of which runs a results directory holds for each
cell: :mod:`masq.grid.peer_manifest`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from masq.config import RunConfig
from masq.errors import ConfigError
from masq.grid.expand import expand
from masq.grid.spec import GRID_KEYS, Grid, grid_from_mapping, toml_values
from masq.grid.tune import tuning_split
from masq.runid import run_id

FOLDER = "peers"  # presets/peers/NAME.toml
TOP_KEYS = ("name", "title", "citation", "source", "statistic", "spread", "notes", "columns",
            "axes", "rows", "reference", "tune_seeds", "tune_axes")  # fmt: skip
ROW_KEYS = ("name", "axes", "columns", "published", "note")


@dataclasses.dataclass(frozen=True)
class PeerRow:
    """One method of the table: its grid keys, per-column keys and the published values."""

    name: str
    axes: Mapping[str, Any]
    by_column: Mapping[str, Mapping[str, Any]]
    published: Mapping[str, tuple[float, float]]  # column value -> (mean, spread), in %
    note: str = ""

    @property
    def ours(self) -> bool:
        """A row the publication does not have (no published value in any column)."""
        return not self.published


@dataclasses.dataclass(frozen=True)
class PeerPreset:
    """A published table as runs (module docstring)."""

    name: str
    title: str
    citation: str
    source: str
    statistic: str
    spread: str
    field: str
    columns: tuple[str, ...]
    labels: tuple[str, ...]
    axes: Mapping[str, Any]
    rows: tuple[PeerRow, ...]
    notes: tuple[str, ...] = ()
    reference: str = ""  # the row the others are compared with, paired by seed ("": none)
    column_axes: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    tune_seeds: int = 0  # a sweep's tuning seeds (module docstring); 0: every seed sweeps
    tune_axes: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # tuning runs only

    @property
    def tunes(self) -> bool:
        """Whether a λ sweep's runs split into tuning and table runs
        (:func:`~masq.grid.tune.tuning_split`)."""
        return bool(self.tune_seeds or self.tune_axes)

    def label(self, column: str) -> str:
        """The publication's name of ``column``."""
        return self.labels[self.columns.index(column)]

    def selected_columns(self, overrides: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The columns a value of the column field in ``overrides`` restricts the table to,
        in the table's order (every column without one); a value that is not a column is a
        one-line ConfigError."""
        if not overrides or self.field not in overrides:
            return self.columns
        wanted = overrides[self.field]
        wanted = [str(v) for v in (wanted if isinstance(wanted, list | tuple) else [wanted])]
        unknown = [v for v in wanted if v not in self.columns]
        if unknown:
            raise ConfigError(
                f"preset {self.name}: {self.field} {unknown[0]!r} is not a column of the "
                f"table; its columns: {', '.join(self.columns)}"
            )
        return tuple(c for c in self.columns if c in wanted)

    def cell_grids(
        self,
        overrides: Mapping[str, Any] | None = None,
        rows: Sequence[str] | None = None,
        *,
        tuned: bool = False,
    ) -> list[tuple[str, str, Grid]]:
        """(row name, column value, grid) of every cell, in the table's order; ``overrides``
        (grid keys) apply to every cell, and a value of the column field restricts the
        columns to the ones it names; ``rows`` (names) restricts the rows; ``tuned``: with
        the preset's ``tune_axes`` after the row's keys (the grids of tuning runs)."""
        overrides = dict(overrides or {})
        unknown_rows = sorted(set(rows or ()) - {r.name for r in self.rows})
        if unknown_rows:
            raise ConfigError(
                f"preset {self.name}: no row {unknown_rows[0]!r}; its rows: "
                + ", ".join(repr(r.name) for r in self.rows)
            )
        columns = self.selected_columns(overrides)
        overrides.pop(self.field, None)
        cells = []
        for row in self.rows:
            if rows and row.name not in rows:
                continue
            for column in columns:
                values = {**self.axes, **self.column_axes.get(column, {}), **row.axes,
                          **row.by_column.get(column, {}),
                          **(self.tune_axes if tuned else {})}  # fmt: skip
                for given, other in (("seed", "seeds"), ("seeds", "seed"), ("hidden", "layers"),
                                     ("hidden", "sizes"), ("layers", "hidden")):  # fmt: skip
                    if given in overrides:
                        values.pop(other, None)
                values = {**values, self.field: column, **overrides}
                where = f"preset {self.name}, row {row.name!r}, {self.field} {column}"
                cells.append((row.name, column, grid_from_mapping(values, Grid(), where=where)))
        return cells

    def cells(
        self, overrides: Mapping[str, Any] | None = None, rows: Sequence[str] | None = None
    ) -> dict[str, list[RunConfig]]:
        """{cell key (:func:`cell_key`): its run configurations}; with ``tune_axes``, a λ
        sweep's are its table runs at every λ and then its tuning runs
        (:func:`~masq.grid.tune.tuning_split` tells them apart)."""
        out = {}
        tuned = self.cell_grids(overrides, rows, tuned=True) if self.tune_axes else []
        for i, (row, column, grid) in enumerate(self.cell_grids(overrides, rows)):
            configs = expand(grid)
            if tuned and len({c.lam for c in configs}) > 1:
                seeds = sorted({c.seed for c in configs})
                keep = set(seeds[: self.tune_seeds] if self.tune_seeds else seeds)
                ids = {run_id(c) for c in configs}
                configs += [c for c in expand(tuned[i][2])
                            if c.seed in keep and run_id(c) not in ids]  # fmt: skip
            out[cell_key(row, column)] = configs
        return out

    def configs(
        self, overrides: Mapping[str, Any] | None = None, rows: Sequence[str] | None = None
    ) -> list[RunConfig]:
        """Every run the table starts with, once (the union of the cells' runs, first
        occurrence kept; of a sweep with tuning seeds only their tuning runs:
        :func:`~masq.grid.tune.tuning_split`)."""
        seen: set[str] = set()
        out = []
        for configs in self.cells(overrides, rows).values():
            for config in tuning_split(configs, self.tune_seeds, self.tune_axes)[0]:
                rid = run_id(config)
                if rid not in seen:
                    seen.add(rid)
                    out.append(config)
        return out


def cell_key(row: str, column: str) -> str:
    """The key of one cell in a manifest: "<row> | <column>"."""
    return f"{row} | {column}"


def list_peer_presets() -> list[str]:
    """The names of the peer presets shipped with masq."""
    folder = resources.files("masq").joinpath("presets", FOLDER)
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def is_peer_preset(name: str) -> bool:
    """Whether ``name`` is one of :func:`list_peer_presets`."""
    return name in list_peer_presets()


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def _count(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key} must be a whole number >= 0, got {value!r}")
    return value


def _table(value: Any, key: str, where: str, *, grid: bool | None = None) -> dict[str, Any]:
    """``value`` as a dict; a one-line ConfigError unless it is a table whose keys, where it
    holds grid keys (``grid``; default: ``key`` ends in "axes"), are grid keys."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key!r} must be a table ([{key}]), got {value!r}")
    grid = key.endswith("axes") if grid is None else grid
    unknown = sorted(set(value) - set(GRID_KEYS)) if grid else []
    if unknown:
        raise ConfigError(f"{where}: unknown grid key {unknown[0]!r} in {key!r}")
    return dict(value)


def _published(value: Any, columns: Sequence[str], where: str) -> dict[str, tuple[float, float]]:
    out = {}
    for column, pair in _table(value, "published", where).items():
        if column not in columns:
            raise ConfigError(f"{where}: published value for {column!r}, not a column")
        ok = isinstance(pair, list) and len(pair) in (1, 2)
        if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in pair):
            raise ConfigError(
                f"{where}: published.{column} must be [mean, spread] (or [mean] where the "
                f"publication gives no spread), got {pair!r}"
            )
        out[column] = (float(pair[0]), float(pair[1]) if len(pair) == 2 else math.nan)
    return out


def peer_preset_from_mapping(data: Mapping[str, Any], where: str) -> PeerPreset:
    """A :class:`PeerPreset` of a parsed TOML (module docstring); bad keys: ConfigError."""
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(TOP_KEYS)}")
    cols = _table(data.get("columns"), "columns", where)
    field = _text(cols.get("field"), "columns.field", where)
    if field not in GRID_KEYS:
        raise ConfigError(f"{where}: columns.field {field!r} is not a grid key")
    columns = tuple(str(v) for v in cols.get("values", []))
    labels = tuple(str(v) for v in cols.get("labels", columns))
    if not columns or len(labels) != len(columns):
        raise ConfigError(f"{where}: give columns.values and as many columns.labels")
    column_axes = cols.get("axes", {})
    if not isinstance(column_axes, dict):
        raise ConfigError(f"{where}: columns.axes must be a table of columns, got {column_axes!r}")
    for column, keys in column_axes.items():
        if column not in columns:
            raise ConfigError(f"{where}: columns.axes has keys for {column!r}, not a column")
        column_axes[column] = _table(keys, f"columns.axes.{column}", where, grid=True)
    unknown_keys = sorted(set(cols) - {"field", "values", "labels", "axes"})
    if unknown_keys:
        raise ConfigError(
            f"{where}: unknown key columns.{unknown_keys[0]}; known: field, values, labels, axes"
        )
    rows = []
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ConfigError(f"{where}: give at least one [[rows]] entry")
    for i, raw in enumerate(raw_rows):
        at = f"{where}, row {i + 1}"
        extra = sorted(set(raw) - set(ROW_KEYS))
        if extra:
            raise ConfigError(f"{at}: unknown key {extra[0]!r}; known: {', '.join(ROW_KEYS)}")
        by_column = _table(raw.get("columns", {}), "columns", at)
        for column, keys in by_column.items():
            if column not in columns:
                raise ConfigError(f"{at}: keys for {column!r}, which is not a column")
            by_column[column] = _table(keys, f"columns.{column}.axes", at)
        rows.append(
            PeerRow(
                name=_text(raw.get("name"), "name", at),
                axes=_table(raw.get("axes", {}), "axes", at),
                by_column=by_column,
                published=_published(raw.get("published", {}), columns, at),
                note=str(raw.get("note", "")),
            )
        )
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two rows share a name; names: {names}")
    tune_axes = _tune_axes(data.get("tune_axes", {}), field, where)
    reference = str(data.get("reference", ""))
    if reference and reference not in names:
        raise ConfigError(f"{where}: reference {reference!r} is not a row; rows: {names}")
    return PeerPreset(
        name=_text(data.get("name"), "name", where),
        title=_text(data.get("title"), "title", where),
        citation=_text(data.get("citation"), "citation", where),
        source=_text(data.get("source"), "source", where),
        statistic=_text(data.get("statistic"), "statistic", where),
        spread=_text(data.get("spread"), "spread", where),
        field=field,
        columns=columns,
        labels=labels,
        axes=_table(data.get("axes", {}), "axes", where),
        rows=tuple(rows),
        notes=tuple(str(n) for n in data.get("notes", [])),
        reference=reference,
        column_axes=column_axes,
        tune_seeds=_count(data.get("tune_seeds", 0), "tune_seeds", where),
        tune_axes=tune_axes,
    )


def _tune_axes(value: Any, field: str, where: str) -> dict[str, Any]:
    """The preset's ``tune_axes``: fields of a run configuration with one value each, other
    than λ, the seed and the column field; else a one-line ConfigError."""
    axes = _table(value, "tune_axes", where)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for key, one in axes.items():
        if key not in names or key in ("lam", "seed", field):
            raise ConfigError(
                f"{where}: tune_axes.{key}: give fields of a run's configuration other than "
                f"lam, seed and the column field {field!r}"
            )
        if isinstance(one, list | dict):
            raise ConfigError(f"{where}: tune_axes.{key} must be one value, got {one!r}")
    return axes


def load_peer_preset(name: str) -> PeerPreset:
    """The peer preset ``name`` shipped with masq; unknown: a one-line ConfigError."""
    names = list_peer_presets()
    if name not in names:
        raise ConfigError(f"unknown peer preset {name!r}; available: {', '.join(names)}")
    resource = resources.files("masq").joinpath("presets", FOLDER, f"{name}.toml")
    where = f"peer preset {name}"
    preset = peer_preset_from_mapping(toml_values(resource.read_bytes(), where), where)
    if preset.name != name:
        raise ConfigError(f"{where}: its file says name = {preset.name!r}")
    return preset


__all__ = [
    "PeerPreset",
    "PeerRow",
    "cell_key",
    "is_peer_preset",
    "list_peer_presets",
    "load_peer_preset",
    "peer_preset_from_mapping",
]
