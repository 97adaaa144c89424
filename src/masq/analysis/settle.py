"""Table 1, settled: the campaign, its extension, the confirmation on fresh seeds, paired tests.

The campaign (:data:`CAMPAIGN`, defined here once): per SLT its paper-best architecture
(from :mod:`masq.defaults`: D5-5: 800-800; D9-1: 800-400-400; DP10-10: 800-800-200),
ε2 ∈ {1e-3, 1e-4, 1e-5, 1e-6} × λ ∈ {0, 0.1, 1, 10, ..., 1e10} × importance {FIM, MaSQ} ×
init {torch, tf}, seed 0, dense-early evaluation with validation curves, bf16. MaSQ runs in
one scale, ``mean`` (the paper's); every λ is reported in both conventions: MaSQ ``sum`` at
λ_sum is MaSQ ``mean`` at λ_mean = B_MaSQ · λ_sum, so λ_sum = λ_mean / B_MaSQ
(:func:`lam_sum`; FIM has one convention).

1. Plane: the grid above (:func:`plane_configs`, run ids as ``masq grid`` gives them).
2. Extension: a series (SLT, ε2, importance, init) whose seed-0 "last" accuracy is highest
   at its largest λ gets λ × 10, again and again, until "last" falls or λ passes
   :attr:`Campaign.lam_cap` (:func:`next_lambda`, :func:`extension_configs`).
3. Selection on seed 0 per (SLT, importance, init, criterion) over ε2 and λ, on the test
   curves (as the paper did) or on the validation curves (:mod:`masq.report.settled` uses
   :func:`masq.report.tables.table1` for it), and the same of the λ = 0 runs alone (no EWC,
   ε2 tuned alike: importance "none"); each winner and, for an EWC "last" winner, its λ = 0
   counterpart re-run on seeds 1-4 (:func:`confirmation_configs`: only the seed changes).
4. The settled tables (:func:`settled_table`: seed-0 value, mean ± sample std over seeds
   1-4) and the inflation of each cell (seed-0 value − that mean, :func:`inflation`); the
   paired t-tests over the seeds (MaSQ against FIM, EWC against no EWC) are
   :mod:`masq.analysis.paired`'s.

The value of a run: "best" = the highest D1∪D2 test accuracy during re-training
(``best.union``), "last" = the final one (``last.union``); selected on validation, the test
accuracy at the point the validation curve selects (``best_val.union``, ``last_val.union``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, SupportsFloat, cast

import numpy as np
import pandas as pd

from masq.analysis.common import records
from masq.config import FIELD, hidden_text, round_sig
from masq.consolidation import method_label
from masq.defaults import PAPER_SLTS, paper_best
from masq.errors import ConfigError
from masq.grid import expand, grid_from_mapping
from masq.grid.spec import AXIS_FIELDS
from masq.runid import run_id

CRITERIA: tuple[str, ...] = ("best", "last")
SELECT_ON: tuple[str, ...] = ("test", "val")
# The blocks of the tables and the columns of the figures, in order.
BLOCKS: tuple[tuple[str, str], ...] = (
    ("fisher", "torch"),
    ("fisher", "tf"),
    ("masq", "torch"),
    ("masq", "tf"),
)
IMPORTANCE_NAME: dict[str, str] = {"fisher": "FIM", "masq": "MaSQ", "none": "no EWC"}
# the settled tables add the no-EWC winners (λ = 0, ε2 selected) after the EWC blocks
TABLE_BLOCKS: tuple[tuple[str, str], ...] = (*BLOCKS, ("none", "torch"), ("none", "tf"))
KEYS: tuple[str, ...] = ("select_on", "importance", "init", "slt", "criterion")


@dataclass(frozen=True)
class Campaign:
    """What Table 1, settled runs (module docstring); :data:`CAMPAIGN` is the one in use."""

    architectures: tuple[tuple[str, tuple[int, ...]], ...] = tuple(
        (slt, paper_best(slt)[0]) for slt in PAPER_SLTS
    )
    lr2s: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6)
    lams: tuple[float, ...] = (0.0, 0.1, *(10.0**k for k in range(11)))
    importances: tuple[str, ...] = ("fisher", "masq")
    inits: tuple[str, ...] = ("torch", "tf")
    scale: str = "mean"
    eval_schedule: str = "dense-early"
    precision: str = "bf16"
    eval_val: bool = True
    seed: int = 0
    confirm_seeds: tuple[int, ...] = (1, 2, 3, 4)
    lam_cap: float = 1e16
    base: tuple[tuple[str, Any], ...] = field(default=())  # other axes, one value each

    @property
    def slts(self) -> tuple[str, ...]:
        """The SLTs in the order they are run."""
        return tuple(slt for slt, _ in self.architectures)

    def hidden(self, slt: str) -> tuple[int, ...]:
        """The architecture of ``slt``; an SLT outside the campaign is a ConfigError."""
        for name, hidden in self.architectures:
            if name == slt:
                return hidden
        raise ConfigError(f"--slt {slt!r} is not in Table 1, settled; use some of {self.slts}")

    def fixed(self) -> dict[str, Any]:
        """The axes with one value in every run of the campaign."""
        return dict(self.base) | {
            "scale": self.scale,
            "eval_schedule": self.eval_schedule,
            "precision": self.precision,
            "eval_val": self.eval_val,
        }


CAMPAIGN = Campaign()


# ----------------------------------------------------------------------------- λ conventions


def lam_sum(lam: float, importance: str, masq_batch: int) -> float:
    """λ in the MaSQ ``sum`` convention of a run at λ (``mean`` convention): λ / B_MaSQ for
    MaSQ (λ = 0 stays 0); NaN for the FIM, which has one convention."""
    if importance != "masq":
        return math.nan
    return round_sig(float(lam) / int(masq_batch))


def lam_mean(lam_sum_value: float, masq_batch: int) -> float:
    """The inverse of :func:`lam_sum`: λ_mean = B_MaSQ · λ_sum."""
    return round_sig(float(lam_sum_value) * int(masq_batch))


# ----------------------------------------------------------------------------- configs


def campaign_grid(
    campaign: Campaign,
    slt: str,
    *,
    lr2s: Sequence[float] | None = None,
    lams: Sequence[float] | None = None,
    importances: Sequence[str] | None = None,
    inits: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> Any:
    """The :class:`masq.grid.Grid` of ``slt`` in ``campaign`` (each axis narrowed if given)."""
    values = campaign.fixed() | {
        "slt": slt,
        "hidden": [list(campaign.hidden(slt))],
        "lr2": list(campaign.lr2s if lr2s is None else lr2s),
        "lam": list(campaign.lams if lams is None else lams),
        "importance": list(campaign.importances if importances is None else importances),
        "init": list(campaign.inits if inits is None else inits),
        "seeds": list([campaign.seed] if seeds is None else seeds),
    }
    return grid_from_mapping(values, where="table1")


def unique(configs: Iterable[Any]) -> list[Any]:
    """``configs`` without repeated run ids (first kept)."""
    seen: dict[str, Any] = {}
    for config in configs:
        seen.setdefault(run_id(config), config)
    return list(seen.values())


def plane_configs(campaign: Campaign, slt: str) -> list[Any]:
    """The seed-0 plane of ``slt``: every ε2 × λ × importance × init (λ = 0 canonical)."""
    return expand(campaign_grid(campaign, slt))


def campaign_rows(df: pd.DataFrame, campaign: Campaign) -> pd.DataFrame:
    """The rows of a store's frame (:func:`masq.store.load`) that belong to ``campaign``:
    its SLTs at their architectures, ε2 values, importances (or λ = 0), inits and fixed axes."""
    if df.empty:
        return df
    arch = {slt: hidden_text(h) for slt, h in campaign.architectures}
    mask = df["slt"].map(arch).eq(df["hidden"])
    mask &= df["lr2"].map(lambda v: any(math.isclose(v, x) for x in campaign.lr2s))
    mask &= df["importance"].isin([*campaign.importances, "none"]) & df["init"].isin(campaign.inits)
    for name, value in campaign.fixed().items():
        if name == "scale":
            mask &= (df["importance"] != "masq") | (df["scale"] == value)
        else:
            mask &= df[name] == value
    return df[mask]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def row_mapping(row: Mapping[str, Any] | pd.Series) -> dict[str, Any]:
    """The grid mapping (one value per axis) of a stored run's row (:func:`masq.store.flat_row`)."""
    out = {f.name: _plain(row[f.name]) for f in AXIS_FIELDS if f.name in row}
    out["hidden"] = [int(h) for h in str(out["hidden"]).split("-") if h]
    return out


def reseeded(row: Mapping[str, Any] | pd.Series, seeds: Sequence[int], **changes: Any) -> list[Any]:
    """The configs of run ``row`` on ``seeds`` (and ``changes``, e.g. lam=0), through
    :func:`masq.grid.expand`: canonical, with the run ids of an equivalent ``masq grid``."""
    values = row_mapping(row) | dict(changes)
    values.pop("seed", None)
    values["seeds"] = list(seeds)
    return expand(grid_from_mapping(values, where="table1"))


def winner_row(df: pd.DataFrame, winner: Mapping[str, Any]) -> pd.Series:
    """The stored seed-0 row of a Table-1 winner (its first run id)."""
    rid = str(winner["run_ids"]).split(",")[0]
    return df[df["run_id"] == rid].iloc[0]


def confirmation_configs(
    winners: pd.DataFrame, df: pd.DataFrame, seeds: Sequence[int]
) -> list[Any]:
    """Every winner of ``winners`` (rows of Table 1 on seed 0) on ``seeds``, and for EWC
    "last" winners also their λ = 0 counterpart on ``seeds``; duplicates dropped."""
    configs: list[Any] = []
    for winner in records(winners):
        row = winner_row(df, winner)
        configs += reseeded(row, seeds)
        if has_counterpart(winner):
            configs += reseeded(row, seeds, lam=0.0)
    return unique(configs)


# ----------------------------------------------------------------------------- extension


def next_lambda(lams: Sequence[float], lasts: Sequence[float], cap: float) -> float | None:
    """10 × the largest λ when its "last" accuracy is strictly above that of every smaller
    λ (> 0) of the series and 10 × λ is at most ``cap``; else None (NaN counts as -inf)."""
    points = sorted((float(lam), float(v)) for lam, v in zip(lams, lasts, strict=True) if lam > 0)
    if len(points) < 2:
        return None
    top = points[-1][1]
    top = -math.inf if math.isnan(top) else top
    below = max(-math.inf if math.isnan(v) else v for _, v in points[:-1])
    nxt = round_sig(points[-1][0] * 10)
    return nxt if top > below and nxt <= cap else None


def extension_plan(df: pd.DataFrame, campaign: Campaign, slt: str) -> list[dict[str, Any]]:
    """Per series (``slt``, ε2, importance, init) of the stored seed-0 runs whose "last" still
    rises at its largest λ: {"lr2", "importance", "init", "lam"} with the λ to run next."""
    rows = campaign_rows(df, campaign)
    if rows.empty:
        return []
    rows = rows[(rows["slt"] == slt) & (rows["seed"] == campaign.seed) & (rows["lam"] > 0)]
    out = []
    for (lr2, imp, init), part in rows.groupby(["lr2", "importance", "init"], sort=True):
        lam = next_lambda(list(part["lam"]), list(part["last.union"]), campaign.lam_cap)
        if lam is not None:
            out.append(
                {"lr2": float(cast(float, lr2)), "importance": imp, "init": init, "lam": lam}
            )
    return out


def extension_configs(df: pd.DataFrame, campaign: Campaign, slt: str) -> list[Any]:
    """The configs of the next extension round of ``slt`` (:func:`extension_plan`)."""
    configs = []
    for p in extension_plan(df, campaign, slt):
        grid = campaign_grid(campaign, slt, lr2s=[p["lr2"]], lams=[p["lam"]],
                             importances=[p["importance"]], inits=[p["init"]])  # fmt: skip
        configs += expand(grid)
    return unique(configs)


# ----------------------------------------------------------------------------- settled tables


def value_column(select_on: str, criterion: str) -> str:
    """The accuracy reported for a run: ``best.union``/``last.union`` (selected on test) or
    ``best_val.union``/``last_val.union`` (test accuracy at the point selected on val)."""
    return f"{criterion}.union" if select_on == "test" else f"{criterion}_val.union"


def confirmation_values(
    winners: pd.DataFrame, df: pd.DataFrame, campaign: Campaign
) -> pd.DataFrame:
    """Long frame, one row per winner (``KEYS``) and seed (seed 0 and the confirmation seeds):
    ``value`` (:func:`value_column` of that seed's run, NaN when not stored) and, for EWC
    "last", ``lam0`` (the same of the λ = 0 counterpart); ``run_id`` of the run looked for."""
    by_id = df.set_index("run_id")
    seeds = [campaign.seed, *campaign.confirm_seeds]
    rows = []
    for w in records(winners):
        row = winner_row(df, w)
        column = value_column(w["selected_on"], w["criterion"])
        runs = reseeded(row, seeds)
        zeros = reseeded(row, seeds, lam=0.0) if has_counterpart(w) else [None] * len(runs)
        for config, zero in zip(runs, zeros, strict=True):
            rid = run_id(config)
            zid = run_id(zero) if zero is not None else None
            rows.append(
                {
                    "select_on": w["selected_on"],
                    "importance": w["importance"],
                    "init": w["init"],
                    "slt": w["slt"],
                    "criterion": w["criterion"],
                    "seed": int(config.seed),
                    "run_id": rid,
                    "value": _lookup(by_id, rid, column),
                    "lam0": _lookup(by_id, zid, column) if zid else math.nan,
                }
            )
    return pd.DataFrame(rows)


def has_counterpart(winner: Mapping[str, Any]) -> bool:
    """Whether a winner has a λ = 0 counterpart to confirm: an EWC "last" winner."""
    last: bool = winner["criterion"] == "last" and winner["importance"] != "none"
    return last


def _lookup(by_id: pd.DataFrame, rid: str, column: str) -> float:
    if rid not in by_id.index or column not in by_id.columns:
        return math.nan
    return float(cast(SupportsFloat, by_id.at[rid, column]))


def _spread(values: pd.Series) -> tuple[float, float, int]:
    v = values.dropna()
    return (
        float(v.mean()) if len(v) else math.nan,
        float(v.std(ddof=1)) if len(v) > 1 else math.nan,
        len(v),
    )


def settled_table(winners: pd.DataFrame, values: pd.DataFrame, campaign: Campaign) -> pd.DataFrame:
    """One row per winner: its configuration, λ in both conventions (:func:`lam_sum`), the
    seed-0 value, mean, sample std (ddof 1) and count over the confirmation seeds, and for
    "last" the same of the λ = 0 counterpart."""
    rows = []
    for w in winners.to_dict("records"):
        key = {k: w["selected_on"] if k == "select_on" else w[k] for k in KEYS}
        mask = np.logical_and.reduce([values[k] == v for k, v in key.items()])
        part = values[mask]
        zero, more = part[part["seed"] == campaign.seed], part[part["seed"] != campaign.seed]
        mean, std, n = _spread(more["value"])
        z_mean, z_std, z_n = _spread(more["lam0"])
        lam = float(w["lam"])
        masq_batch = int(w.get("masq_batch", FIELD["masq_batch"].default))
        rows.append(
            key
            | {
                "hidden": w["hidden"],
                "lr2": float(w["lr2"]),
                "lam": lam,
                "lam_sum": lam_sum(lam, w["importance"], masq_batch),
                "method": method_label(
                    {"importance": w["importance"], "lam": lam, "scale": campaign.scale}
                ),
                "run_id": str(w["run_ids"]).split(",")[0],
                "seed0": float(zero["value"].iloc[0]) if len(zero) else math.nan,
                "mean": mean,
                "std": std,
                "n": n,
                "lam0_seed0": float(zero["lam0"].iloc[0]) if len(zero) else math.nan,
                "lam0_mean": z_mean,
                "lam0_std": z_std,
                "lam0_n": z_n,
            }
        )
    return pd.DataFrame(rows)


def inflation(settled: pd.DataFrame) -> pd.DataFrame:
    """Per cell of the settled tables: ``inflation`` = seed-0 value − mean over the
    confirmation seeds (how much selecting on one seed flatters the winner); for "last" also
    ``lam0_inflation``, the same for the λ = 0 counterpart (seed 0's luck with no λ chosen),
    and ``net`` = inflation − lam0_inflation (NaN for "best", which has no counterpart)."""
    cols = [*KEYS, "lam", "seed0", "mean", "n", "lam0_seed0", "lam0_mean"]
    out = settled[cols].copy()
    out["inflation"] = settled["seed0"] - settled["mean"]
    out["lam0_inflation"] = settled["lam0_seed0"] - settled["lam0_mean"]
    out["net"] = out["inflation"] - out["lam0_inflation"]
    return out


# ----------------------------------------------------------------------------- Markdown


def with_confirm_seeds(campaign: Campaign, seeds: Sequence[int]) -> Campaign:
    """``campaign`` confirmed on ``seeds`` (each ≥ 0, none the selection seed)."""
    if not seeds or any(s < 0 or s == campaign.seed for s in seeds):
        raise ConfigError(
            f"--seeds must be seeds >= 0 other than the selection seed {campaign.seed}, got "
            f"{list(seeds)}"
        )
    return dataclasses.replace(campaign, confirm_seeds=tuple(dict.fromkeys(int(s) for s in seeds)))
