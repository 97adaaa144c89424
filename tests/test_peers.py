"""Peer presets (masq.grid.peers), the published-table comparison (masq.analysis.peers)
and its files (masq.analysis.peer_files)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import masq.data
from masq.analysis import peer_files
from masq.analysis import peers as analysis
from masq.cli import main
from masq.config import RunConfig
from masq.errors import ConfigError
from masq.grid import peer_manifest, peers, tune
from masq.runid import d1_key, run_id
from tests.synthetic import learnable_dataset

TINY: dict[str, Any] = {
    "name": "tiny",
    "title": "A tiny table",
    "citation": "Someone (2019)",
    "source": "Table 9",
    "statistic": "average accuracy",
    "spread": "SEM over 3 runs",
    "notes": ["a note"],
    "reference": "None",
    "columns": {"field": "scenario", "values": ["task", "class"], "labels": ["Task", "Class"]},
    "axes": {"slt": "D5-5", "hidden": "8", "iters1": 10, "iters2": 10, "eval_every": 5,
             "batch_size": 20, "masq_batch": 50, "seeds": 2, "eval_val": True},
    "rows": [
        {"name": "None", "axes": {"importance": "none", "lam": 0},
         "published": {"task": [90.0, 1.0], "class": [50.0, 0.5]}},
        {"name": "EWC", "axes": {"importance": "fisher", "lam": 10},
         "columns": {"class": {"lam": 100}}, "published": {"task": [95.0, 0.2], "class": [30]}},
        {"name": "MaSQ", "axes": {"importance": "masq", "lam": [1, 10, 100]}},
    ],
}  # fmt: skip


def tiny() -> peers.PeerPreset:
    return peers.peer_preset_from_mapping(TINY, "test")


# ----------------------------------------------------------------------------- the preset


def test_cells_take_row_column_and_override_keys_in_order() -> None:
    cells = tiny().cells()
    assert list(cells) == [
        "None | task", "None | class", "EWC | task", "EWC | class", "MaSQ | task", "MaSQ | class"
    ]  # fmt: skip
    assert [c.lam for c in cells["EWC | task"]] == [10.0, 10.0]  # the row's λ
    assert [c.lam for c in cells["EWC | class"]] == [100.0, 100.0]  # the column's own λ
    assert {c.scenario.value for c in cells["EWC | class"]} == {"class"}
    assert sorted({c.lam for c in cells["MaSQ | task"]}) == [1.0, 10.0, 100.0]
    assert {c.seed for c in cells["None | task"]} == {0, 1}
    small = tiny().cells({"seed": [3], "iters1": 4, "scenario": ["class"]})
    assert list(small) == ["None | class", "EWC | class", "MaSQ | class"]
    assert {(c.seed, c.iters1) for cs in small.values() for c in cs} == {(3, 4)}


def test_column_axes_apply_to_every_row_of_their_column_below_the_rows_keys() -> None:
    columns = {**TINY["columns"], "axes": {"class": {"class_units": "seen", "lam": 7}}}
    cells = peers.peer_preset_from_mapping({**TINY, "columns": columns}, "test").cells()
    assert {c.class_units.value for c in cells["None | class"]} == {"seen"}
    assert {c.class_units.value for c in cells["None | task"]} == {"all"}
    assert {c.lam for c in cells["None | class"]} == {0.0}  # the row's λ wins
    assert {c.lam for c in cells["EWC | class"]} == {100.0}  # the row's column λ wins
    for bad, problem in (
        ({"domain": {"lam": 1}}, "keys for 'domain', not a column"),
        ({"class": {"lamb": 1}}, "unknown grid key 'lamb'"),
        ([1], "columns.axes must be a table"),
    ):
        with pytest.raises(ConfigError, match=problem):
            peers.peer_preset_from_mapping(
                {**TINY, "columns": {**TINY["columns"], "axes": bad}}, "test"
            )
    with pytest.raises(ConfigError, match=r"unknown key columns\.width"):
        peers.peer_preset_from_mapping({**TINY, "columns": {**columns, "width": 3}}, "test")
    split = peers.load_peer_preset("vdv2019-split").cells(rows=["EWC"])
    assert {c.class_units.value for c in split["EWC | class"]} == {"seen"}
    assert {c.class_units.value for c in split["EWC | task"]} == {"all"}


def test_configs_are_the_union_of_the_cells_once() -> None:
    preset = tiny()
    ids = [run_id(c) for c in preset.configs()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {run_id(c) for cs in preset.cells().values() for c in cs}
    assert len(ids) == 2 * 2 * (1 + 1 + 3)  # seeds × columns × (None + EWC + 3 λ)


def test_rows_restrict_the_cells_and_the_manifest_keeps_earlier_cells(tmp_path: Path) -> None:
    preset = tiny()
    cells = preset.cells(rows=["EWC"])
    assert list(cells) == ["EWC | task", "EWC | class"]
    with pytest.raises(ConfigError, match="no row 'Nope'; its rows: 'None', 'EWC', 'MaSQ'"):
        preset.cells(rows=["Nope"])
    peer_manifest.write_manifest(tmp_path, preset, {}, cells)
    later = preset.cells({"seed": [7]}, rows=["None", "EWC"])
    peer_manifest.write_manifest(tmp_path, preset, {"seed": [7]}, later)
    recorded = peer_manifest.read_manifest(tmp_path, "tiny")
    assert recorded is not None and set(recorded) == set(later)
    assert recorded["EWC | task"] == [run_id(c) for c in later["EWC | task"]]  # replaced
    peer_manifest.write_manifest(
        tmp_path, preset, {"seed": [7]}, preset.cells({"seed": [7]}, ["MaSQ"])
    )
    recorded = peer_manifest.read_manifest(tmp_path, "tiny")
    assert recorded is not None and len(recorded) == 6  # the same flags: the others are kept
    peer_manifest.write_manifest(tmp_path, preset, {}, preset.cells(rows=["MaSQ"]))
    recorded = peer_manifest.read_manifest(
        tmp_path, "tiny"
    )  # other flags: the seed-7 cells dropped
    assert recorded is not None and set(recorded) == {"MaSQ | task", "MaSQ | class"}
    task = preset.cells({"scenario": ["task"]}, rows=["EWC"])  # a column: as --rows, no flag
    peer_manifest.write_manifest(tmp_path, preset, {"scenario": ["task"]}, task)
    recorded = peer_manifest.read_manifest(tmp_path, "tiny")
    assert recorded is not None and set(recorded) == {"MaSQ | task", "MaSQ | class", "EWC | task"}
    peer_manifest.write_manifest(tmp_path, preset, {}, preset.cells(rows=["MaSQ"]))
    manifest = peer_manifest.load_manifest(tmp_path, "tiny")
    assert manifest is not None and manifest.definition == peer_manifest.definition(preset)
    assert manifest.expected == {key: len(ids) for key, ids in recorded.items()}  # no tuning
    path = peer_manifest.manifest_path(tmp_path, "tiny")
    path.write_text('{"format": "masq-peers", "cells": [1]}', encoding="utf-8")
    with pytest.raises(ConfigError, match="malformed peers manifest"):
        peer_manifest.load_manifest(tmp_path, "tiny")
    assert peer_manifest.manifest_definition(tmp_path, "tiny") is None
    peer_manifest.write_manifest(tmp_path, preset, {}, cells)  # a malformed manifest is replaced
    assert set(peer_manifest.read_manifest(tmp_path, "tiny") or {}) == set(cells)


def test_the_table_fills_cells_no_flagless_grid_ran_with_the_shipped_runs(
    tmp_path: Path,
) -> None:
    """A grid of some rows only (no flags) leaves the other cells to the preset as shipped;
    a grid run with flags tabulates its own cells alone; no manifest: every shipped cell."""
    preset = tiny()
    shipped = {key: [run_id(c) for c in cs] for key, cs in preset.cells().items()}
    all_expected = tune.expected_runs(preset.cells(), preset.tune_seeds, preset.tune_axes)
    assert peer_manifest.table_cells(preset, None) == (shipped, all_expected)
    peer_manifest.write_manifest(tmp_path, preset, {}, preset.cells(rows=["MaSQ"]))
    cells, expected = peer_manifest.table_cells(
        preset, peer_manifest.load_manifest(tmp_path, "tiny")
    )
    assert cells == shipped and expected == all_expected
    flagged = preset.cells({"seed": [7]}, rows=["EWC"])
    peer_manifest.write_manifest(tmp_path, preset, {"seed": [7]}, flagged)
    cells, _ = peer_manifest.table_cells(preset, peer_manifest.load_manifest(tmp_path, "tiny"))
    assert cells["EWC | task"] == [run_id(c) for c in flagged["EWC | task"]]
    assert set(cells) == {"EWC | task", "EWC | class"}  # its own cells alone
    old = peer_manifest.Manifest(cells={"EWC | task": ["x"]})  # written before `expected` existed
    cells, expected = peer_manifest.table_cells(preset, old)
    assert cells["EWC | task"] == ["x"] and len(cells) == len(shipped)
    assert expected == {**all_expected, "EWC | task": 1}
    assert peer_manifest.table_cells(preset, peer_manifest.Manifest(cells=shipped)) == (
        shipped,
        None,
    )


def test_a_changed_preset_does_not_tabulate_the_runs_of_its_old_definition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cells recorded by an earlier definition of the preset (its settings since changed, e.g.
    Adam's state) are another table's: a new invocation drops them, and `masq peers` does not
    tabulate them."""
    old = tiny()
    peer_manifest.write_manifest(tmp_path, old, {"seed": [7]}, old.cells({"seed": [7]}))
    assert peer_manifest.manifest_definition(tmp_path, "tiny") == peer_manifest.definition(old)
    edited = peers.peer_preset_from_mapping(
        {**TINY, "axes": {**TINY["axes"], "adam_state": "keep"}}, "test"
    )
    assert peer_manifest.definition(edited) != peer_manifest.definition(old)
    peer_manifest.write_manifest(tmp_path, edited, {}, edited.cells(rows=["MaSQ"]))
    recorded = peer_manifest.read_manifest(tmp_path, "tiny")
    assert recorded is not None and set(recorded) == {"MaSQ | task", "MaSQ | class"}  # old gone
    assert recorded["MaSQ | task"] == [run_id(c) for c in edited.cells()["MaSQ | task"]]
    # `masq peers` with a manifest of another definition: the preset as shipped, and a line
    from masq.store import Store

    res = tmp_path / "res"
    Store(res)
    preset = peers.load_peer_preset("vdv2025-fisher")
    cells = preset.cells({"seed": [0]})
    peer_manifest.write_manifest(res, preset, {"seed": [0]}, cells)
    path = peer_manifest.manifest_path(res, "vdv2025-fisher")
    body = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**body, "definition": "an-older-one"}), encoding="utf-8")
    out = ["--out", str(tmp_path / "o")]
    assert main(["peers", "vdv2025-fisher", "--results", str(res), *out]) == 2  # nothing stored
    assert "another definition of vdv2025-fisher" in capsys.readouterr().err


def test_peers_names_the_flags_of_the_grid_it_tabulates_and_shipped_ignores_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest written by a grid with flags (more seeds for one cell) makes ``masq peers``
    say so, with the flags; ``--shipped`` tabulates the preset's own runs instead and says
    nothing of the manifest."""
    from masq.store import Store

    res = tmp_path / "res"
    Store(res)
    preset = peers.load_peer_preset("vdv2025-fisher")
    flags = {"seed": [3, 4]}
    peer_manifest.write_manifest(res, preset, flags, preset.cells(flags, rows=["EXACT"]))
    out = ["--out", str(tmp_path / "o")]
    assert main(["peers", "vdv2025-fisher", "--results", str(res), *out]) == 2  # nothing stored
    err = capsys.readouterr().err
    assert "tabulating the runs of the grid run with flags (seed = [3, 4])" in err
    assert "--shipped tabulates the preset's own" in err
    assert main(["peers", "vdv2025-fisher", "--results", str(res), *out, "--shipped"]) == 2
    err = capsys.readouterr().err
    assert err == "masq: error: no stored runs; run `masq grid --preset vdv2025-fisher` first\n"


@pytest.mark.parametrize(
    ("lam", "text"),
    [(500.0, "5e2"), (250.0, "2.5e2"), (0.2, "2e-01"), (1.0, "1e0"), (1e12, "1e12"), (0.0, "0")],
)
def test_lambda_keeps_its_significant_digits(lam: float, text: str) -> None:
    """λ 250 reads "2.5e2", not "2e2" (a one-digit format rounded it to half its value)."""
    assert peer_files.lam_number(lam) == text


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.0004, "< 0.001"),
        (0.0009, "< 0.001"),
        (0.001, "0.001"),
        (0.4712, "0.471"),
        (math.nan, "—"),
    ],
)
def test_p_values_below_a_thousandth_do_not_read_zero(p: float, text: str) -> None:
    assert peer_files.p_text(p) == text


def test_the_remake_command_keeps_shipped() -> None:
    """peers.json's command remakes the same table: with ``--shipped`` where it was given."""
    from masq.cli.peers_cmd import remake_command

    args = argparse.Namespace(name="vdv2019-split", results="my results", shipped=False)
    assert remake_command(args) == "masq peers vdv2019-split --results 'my results'"
    args.shipped = True
    assert remake_command(args) == "masq peers vdv2019-split --results 'my results' --shipped"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"colour": 1}, "unknown key 'colour'"),
        ({"columns": {"field": "nope", "values": ["a"]}}, "columns.field 'nope'"),
        ({"rows": []}, "at least one [[rows]]"),
        ({"rows": [{"name": "A", "published": {"task": [1.0, 2, 3]}}]}, "[mean, spread]"),
        ({"rows": [{"name": "A", "published": {"domain": [1.0, 2.0]}}]}, "not a column"),
        ({"rows": [{"name": "A", "axes": {"lamb": 1}}]}, "unknown grid key 'lamb'"),
        ({"rows": [{"name": "A"}, {"name": "A"}]}, "share a name"),
    ],
)
def test_bad_presets_are_one_line_errors(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        peers.peer_preset_from_mapping({**TINY, **change}, "test")


def test_an_unknown_column_override_names_the_columns() -> None:
    with pytest.raises(ConfigError, match="its columns: task, class"):
        tiny().cells({"scenario": "domain"})


def test_shipped_peer_presets_load_and_cite() -> None:
    names = peers.list_peer_presets()
    assert {"vdv2019-split", "vdv2019-permuted", "vdv2025-fisher"} <= set(names)
    for name in names:
        preset = peers.load_peer_preset(name)
        assert preset.citation and preset.source and preset.rows
        assert any(row.published for row in preset.rows)
        assert preset.configs()  # expands without an error


# ----------------------------------------------------------------------------- the table


def frame_of(values: dict[tuple[str, str], list[tuple[float, float, float]]]) -> pd.DataFrame:
    """(method, column) -> [(λ, val %, test %)] per seed, as peer_frame gives."""
    rows = []
    for (method, column), runs in values.items():
        for seed, (lam, val, test) in enumerate(runs):
            rid = f"{method}{column}{seed}"
            rows.append({"method": method, "column": column, "lam": lam, "seed": seed % 3,
                         "test": test, "val": val, "run_id": rid,
                         "reads_lam": lam > 0})  # fmt: skip
    return pd.DataFrame(rows)


def test_the_table_gives_mean_sem_difference_and_marks() -> None:
    frame = frame_of({
        ("None", "task"): [(0, 0, 89.0), (0, 0, 90.0), (0, 0, 91.0)],
        ("None", "class"): [(0, 0, 40.0), (0, 0, 41.0), (0, 0, math.nan)],  # one diverged
        ("EWC", "task"): [(10, 0, 95.1), (10, 0, 95.2), (10, 0, 95.3)],
        ("MaSQ", "task"): [(1, 80, 70), (1, 82, 71), (10, 90, 60), (10, 91, 61),
                           (100, 85, 99), (100, 86, 99)],
    })  # fmt: skip
    table = analysis.peer_table(frame, tiny()).set_index(["method", "column"])
    none = table.loc[("None", "task")]
    assert none["mean"] == pytest.approx(90.0) and none["sem"] == pytest.approx(1 / math.sqrt(3))
    assert none["diff"] == pytest.approx(0.0) and not none["marked"]
    bad = table.loc[("None", "class")]
    assert bad["seeds"] == 2 and bad["diverged"] == 1 and bad["mean"] == pytest.approx(40.5)
    assert bad["diff"] == pytest.approx(-9.5) and bad["marked"]  # 9.5 > 1 and > 2·SEMs
    ewc = table.loc[("EWC", "task")]
    assert ewc["diff"] == pytest.approx(0.2) and not ewc["marked"]  # within a point
    masq_ = table.loc[("MaSQ", "task")]  # λ 10 has the best validation mean, not the best test
    assert masq_["lam"] == 10 and masq_["lam_chosen_on_val"] and masq_["mean"] == 60.5
    assert math.isnan(masq_["published"])
    md = peer_files.peer_markdown(table.reset_index(), tiny())
    assert "| MaSQ (ours) | 60.50 ± 0.50 (λ 1e1 (val); n=2) | — | — |" in md
    assert "40.50 ± 0.50 (no λ; n=2, 1 diverged) | 50.00 ± 0.50 | -9.50 ◆" in md
    assert "| 30.00 |" in md  # a published value without a spread
    assert "not run yet" in md  # EWC's class cell has no runs
    assert "- a note" in md


def test_a_lam_chosen_at_the_edge_of_its_sweep_is_marked() -> None:
    """MaSQ's task cell chooses λ 100, the top of its sweep (▲), its class cell λ 1, the bottom
    (▼); EWC's single λ is no sweep, so no mark; the note says how to extend the sweep."""
    frame = frame_of({
        ("EWC", "task"): [(10, 0, 95.0), (10, 0, 95.0)],
        ("MaSQ", "task"): [(1, 80, 70), (10, 85, 71), (100, 90, 72)],
        ("MaSQ", "class"): [(1, 90, 70), (10, 85, 71), (100, 80, 72)],
    })  # fmt: skip
    table = analysis.peer_table(frame, tiny()).set_index(["method", "column"])
    assert table.loc[("MaSQ", "task"), "edge"] == "top"
    assert table.loc[("MaSQ", "class"), "edge"] == "bottom"
    assert table.loc[("EWC", "task"), "edge"] == ""
    md = peer_files.peer_markdown(table.reset_index(), tiny())
    assert "(λ 1e2 ▲ (val); n=1)" in md and "(λ 1e0 ▼ (val); n=1)" in md
    assert "(λ 1e1; n=2)" in md
    assert "--preset tiny --rows ROW --lam" in md
    plain = peer_files.peer_markdown(
        table.drop(index=[("MaSQ", "task"), ("MaSQ", "class")]).reset_index(), tiny()
    )
    assert "▲" not in plain and "--lam" not in plain


def test_rows_are_paired_by_seed_against_the_reference() -> None:
    frame = frame_of({
        ("None", "task"): [(0, 0, 80.0), (0, 0, 90.0), (0, 0, 85.0)],
        ("EWC", "task"): [(10, 0, 82.0), (10, 0, 93.0), (10, 0, 86.0)],
        ("MaSQ", "task"): [(1, 80, 70), (1, 81, 71), (1, 82, 72), (10, 90, 81), (10, 91, 92),
                           (10, 92, 86)],
    })  # fmt: skip
    paired = analysis.paired_table(frame, tiny()).set_index("method")
    assert set(paired.index) == {"EWC", "MaSQ"}
    ewc = paired.loc["EWC"]  # d = 2, 3, 1 over seeds 0, 1, 2
    assert ewc["pairs"] == 3 and ewc["diff"] == pytest.approx(2.0)
    assert ewc["p"] == pytest.approx(0.0742, abs=1e-3)  # t = 2 / (1 / √3) on 2 df
    assert paired.loc["MaSQ", "diff"] == pytest.approx(4 / 3)  # at its λ (10): 1, 2, 1
    md = peer_files.paired_markdown(paired.reset_index(), tiny())
    assert "| Task | EWC | 3 | +2.00 |" in md
    no_reference = dataclasses.replace(tiny(), reference="")
    assert analysis.paired_table(frame, no_reference).empty
    with pytest.raises(ConfigError, match="reference 'Nope' is not a row"):
        peers.peer_preset_from_mapping({**TINY, "reference": "Nope"}, "test")


def test_a_partial_cell_says_so_and_is_neither_marked_nor_at_an_edge() -> None:
    """A cell with part of its runs stored (its λ sweep or seeds still running) is shown as
    partial: no ◆, no ▲ / ▼ and no paired test, which would read a half-run sweep as a
    result."""
    frame = frame_of({
        ("None", "task"): [(0, 0, 70.0), (0, 0, 71.0), (0, 0, 72.0)],  # 19 below: marked
        ("MaSQ", "task"): [(1, 80, 70), (1, 82, 71), (10, 90, 60), (10, 91, 61)],  # top: 10
    })  # fmt: skip
    frame["expected"] = 3
    frame.loc[frame["method"] == "MaSQ", "expected"] = 6  # λ = 100 not stored yet
    table = analysis.peer_table(frame, tiny()).set_index(["method", "column"])
    assert table.loc[("None", "task"), "marked"]  # complete: read as a result
    masq = table.loc[("MaSQ", "task")]
    assert (masq["runs"], masq["expected"], masq["edge"]) == (4, 6, "")
    assert analysis.paired_table(frame, tiny()).empty  # nor is it paired against the reference
    complete = frame.assign(expected=frame["expected"].where(frame["method"] != "MaSQ", 4))
    assert list(analysis.paired_table(complete, tiny())["method"]) == ["MaSQ"]
    frame.loc[frame["method"] == "None", "expected"] = 5
    table = analysis.peer_table(frame, tiny())
    row = table.set_index(["method", "column"]).loc[("None", "task")]
    assert not row["marked"]
    md = peer_files.peer_markdown(table, tiny())
    assert "partial: 3 of 5 runs" in md and "partial: 4 of 6 runs" in md
    assert "◆" not in md.split("\n\n")[1]  # the table body carries no mark


def test_tuning_seeds_split_a_sweep_and_count_its_runs() -> None:
    tuned = peers.peer_preset_from_mapping({**TINY, "tune_seeds": 1, "axes": {
        **TINY["axes"], "seeds": 3}}, "test")  # fmt: skip
    cells = tuned.cells()
    tuning, held = tune.tuning_split(cells["MaSQ | task"], 1)
    assert {(c.seed, c.lam) for c in tuning} == {(0, 1.0), (0, 10.0), (0, 100.0)}
    assert {c.seed for c in held} == {1, 2} and len(held) == 6
    assert tune.tuning_split(cells["EWC | task"], 1) == (cells["EWC | task"], [])  # one λ
    assert tune.tuning_split(cells["MaSQ | task"], 3)[1] == []  # no seed left to hold
    assert tune.held_count(cells, 1) == 2 * 2  # seeds 1 and 2 of the two MaSQ cells
    expected = tune.expected_runs(cells, 1)
    assert expected["MaSQ | task"] == 3 + 2 and expected["EWC | task"] == 3
    untuned = dataclasses.replace(tuned, tune_seeds=0)
    assert len(tuned.configs()) == len(untuned.configs()) - 2 * 6  # held runs wait
    assert peer_manifest.definition(tuned) != peer_manifest.definition(untuned)
    with pytest.raises(ConfigError, match="tune_seeds must be a whole number"):
        peers.peer_preset_from_mapping({**TINY, "tune_seeds": -1}, "test")


def test_a_tuned_cell_chooses_lambda_on_its_tuning_seeds_only() -> None:
    """λ from seed 0's validation sets; the other seeds count at that λ only (a run of seed 1
    at another λ, left by an earlier full sweep, chooses nothing and counts for nothing)."""
    tuned = dataclasses.replace(tiny(), tune_seeds=1)
    frame = frame_of({
        ("MaSQ", "task"): [(1, 50, 60), (10, 80, 70), (100, 60, 65)],  # seed 0, 1, 2 ...
    })  # fmt: skip
    frame["seed"] = 0
    extra = frame_of({("MaSQ", "task"): [(10, 70, 74), (100, 99, 99)]})
    extra["seed"] = 1
    frame = pd.concat([frame, extra], ignore_index=True)
    frame["expected"] = 4  # 3 tuning runs + 1 other seed
    row = analysis.peer_table(frame, tuned).set_index(["method", "column"]).loc[("MaSQ", "task")]
    assert row["lam"] == 10.0 and row["lam_chosen_on_val"]
    assert row["mean"] == pytest.approx(72.0) and row["seeds"] == 2
    assert (row["runs"], row["lams"]) == (4, 3)  # complete: no partial mark
    full = analysis.peer_table(frame, tiny()).set_index(["method", "column"])
    assert full.loc[("MaSQ", "task"), "lam"] == 100.0  # without tuning seed 1's 99 % wins
    only_tuning = frame[frame["seed"] == 0]
    row = analysis.peer_table(only_tuning, tuned).set_index(["method", "column"])
    assert row.loc[("MaSQ", "task"), "runs"] == 3  # the other seed still to run: partial


def test_held_runs_start_once_the_tuning_sweep_is_stored() -> None:
    tuned = peers.peer_preset_from_mapping({**TINY, "tune_seeds": 1}, "test")
    cells = {k: v for k, v in tuned.cells().items() if k == "MaSQ | task"}
    tuning, _ = tune.tuning_split(cells["MaSQ | task"], 1)
    vals = {1.0: 0.5, 10.0: 0.9, 100.0: 0.7}
    records = [{"run_id": run_id(c), "lam": c.lam, "seed": c.seed, "consolidation": "ewc",
                "importance": "masq", "tasks": 2, "average_accuracy": 0.8,
                "last_val.val:D1": vals[c.lam], "last_val.val:D2": vals[c.lam]}
               for c in tuning]  # fmt: skip
    df = pd.DataFrame(records)
    runs, waiting = analysis.held_configs(tuned, cells, df)
    assert waiting == 0 and [(c.seed, c.lam) for c in runs] == [(1, 10.0)]
    runs, waiting = analysis.held_configs(tuned, cells, df.iloc[:2])
    assert runs == [] and waiting == 1


def test_held_at_chosen_asks_each_stored_sweep_once_and_counts_the_waiting() -> None:
    tuned = peers.peer_preset_from_mapping({**TINY, "tune_seeds": 1}, "test")
    cells = tuned.cells()
    sweeps = {key: tune.tuning_split(configs, 1) for key, configs in cells.items()}
    stored = {run_id(c) for c in sweeps["MaSQ | task"][0]}  # one sweep stored, one not
    asked: list[tuple[str, list[str]]] = []

    def choose(key: str, ids: list[str]) -> float:
        asked.append((key, ids))
        return 100.0

    runs, waiting = tune.held_at_chosen(sweeps, stored, choose)
    assert [key for key, _ in asked] == ["MaSQ | task"] and set(asked[0][1]) == stored
    assert [(c.seed, c.lam) for c in runs] == [(1, 100.0)]
    assert waiting == sum(1 for _, held in sweeps.values() if held) - 1


def test_a_sweep_without_validation_is_refused() -> None:
    frame = frame_of({("MaSQ", "task"): [(1, math.nan, 70), (10, math.nan, 60)]})
    with pytest.raises(ConfigError, match=r"eval_val = true.*--train-on-val: sweep λ without it"):
        analysis.peer_table(frame, tiny())


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = learnable_dataset(n_train=300, n_val=50, n_test=100)
    monkeypatch.setattr(masq.data, "load", lambda *a, **k: ds)


def test_grid_then_peers_end_to_end(
    tmp_path: Path, tiny_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    res = tmp_path / "peers"
    small = ["--iters1", "10", "--iters2", "10", "--eval-every", "5", "--hidden", "8",
             "--batch-size", "20", "--masq-batch", "50", "--seeds", "2", "--scenario", "task",
             "--workers", "1", "--threads", "1", "--no-progress"]  # fmt: skip
    argv = ["grid", "--preset", "vdv2025-fisher", "--results", str(res), *small]
    assert main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    planned = int(dry.split("grid: ")[1].split(" runs")[0])
    held = int(dry.split("then ")[1].split(" runs")[0])  # seed 1 of each sweep, at its λ
    assert held == 9  # the 9 rows that sweep λ (fine-tuning has none)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"done: {planned} runs now" in out and f"done: {held} runs now" in out
    manifest = json.loads((res / "peers-vdv2025-fisher.json").read_text(encoding="utf-8"))
    assert manifest["overrides"]["iters1"] == [10]
    expected = manifest["expected"]  # per cell (cells that the small flags merge count twice)
    assert expected["None (fine-tuning) | task"] == 2 and expected["EXACT | task"] == 14 + 1
    assert main(["peers", "vdv2025-fisher", "--results", str(res)]) == 0
    out = capsys.readouterr().out
    total = sum(expected.values())
    assert f"{total} of {total} runs stored" in out
    stored = len(list((res / "runs").glob("*.json")))
    compute = json.loads((res / "vdv2025-fisher" / "peers.json").read_text())["compute"]
    assert compute["runs"] == stored and compute["worker_seconds"] > 0
    assert f"Compute: the {stored} runs stored for the table's cells" in out
    assert "partial:" not in out
    table = pd.read_csv(res / "vdv2025-fisher" / "peers.csv")
    preset = peers.load_peer_preset("vdv2025-fisher")
    assert set(table["method"]) == {r.name for r in preset.rows}
    assert np.isfinite(table["mean"]).all() and table["seeds"].eq(2).all()
    assert (res / "vdv2025-fisher" / "peers.png").stat().st_size > 1000
    again = ["peers", "vdv2025-fisher", "--results", str(res), "--out", str(tmp_path / "o")]
    assert main(again) == 0  # tabulates only
    assert "done:" not in capsys.readouterr().out
    command = json.loads((tmp_path / "o" / "peers.json").read_text())["command"]
    assert command == f"masq peers vdv2025-fisher --results {res}"  # what remakes the table
    from masq.report import build_report

    report = build_report([str(tmp_path / "o")], tmp_path / "report")
    part = next(p for p in report.parts if p.id == "peers")
    assert part.present and part.tables and part.figures
    # every run of a seed started from its one cached task-1 state: no line says otherwise
    assert "Task-1 states" not in (tmp_path / "o" / "peers.md").read_text(encoding="utf-8")
    # each record names its task-1 state's fingerprint: one per group, stacked or one by one
    prints: dict[str, set[str]] = {}
    for record in sorted((res / "runs").glob("*.json")):
        result = json.loads(record.read_text(encoding="utf-8"))["result"]
        key = d1_key(RunConfig.from_dict(result["config"]))
        prints.setdefault(key, set()).add(result["meta"]["task1_state"])
    assert all(len(v) == 1 and "" not in v for v in prints.values())
    assert len(set().union(*prints.values())) == len(prints) == 2
    path = sorted((res / "runs").glob("*.json"))[0]
    text = path.read_text(encoding="utf-8")
    body = json.loads(text)
    body["result"]["accuracy"][0][-1] += 0.001  # as if its task-1 state rounded differently
    path.write_text(json.dumps(body), encoding="utf-8")
    assert main(again) == 0
    assert "Task-1 states: in 1 of the 2 groups of runs" in capsys.readouterr().out
    body = json.loads(text)  # the same accuracies, another state's fingerprint
    body["result"]["meta"]["task1_state"] = "0" * 16
    path.write_text(json.dumps(body), encoding="utf-8")
    assert main(again) == 0
    assert "Task-1 states: in 1 of the 2 groups of runs" in capsys.readouterr().out


def test_peers_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["peers", "nope", "--results", str(tmp_path)]) == 2
    assert "unknown peer preset 'nope'; available: " in capsys.readouterr().err
    assert main(["peers"]) == 2
    assert "give a preset NAME and --results DIR" in capsys.readouterr().err
    assert main(["peers", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "vdv2019-split: " in listed and "315 runs + 60 at the λ chosen on the tuning" in listed
    assert main(["grid", "--preset", "nope", "--dry-run"]) == 2
    assert "published tables (masq peers): " in capsys.readouterr().err
    assert main(["grid", "--rows", "EWC", "--dry-run"]) == 2
    assert "--rows selects rows of a published table's preset" in capsys.readouterr().err


def test_grid_says_which_rows_and_columns_of_a_table_it_runs(
    tmp_path: Path, tiny_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["grid", "--preset", "vdv2019-split", "--results", str(tmp_path / "peers"), "--seed",
            "0", "--iters1", "10", "--iters2", "10", "--hidden", "8", "--batch-size", "20",
            "--masq-batch", "50", "--workers", "1", "--threads", "1", "--dry-run",
            "--no-progress"]  # fmt: skip
    assert main([*argv, "--rows", "EWC", "SI", "--scenario", "class"]) == 0
    assert "2 of its 10 rows × 1 of its 3 columns of " in capsys.readouterr().out
    assert main(argv) == 0
    assert "(10 rows × 3 columns of " in capsys.readouterr().out
    one = ["grid", "--preset", "vdv2025-fisher", *argv[3:], "--rows", "EXACT"]
    assert main(one) == 0
    assert "(1 of its 10 rows × 1 column of " in capsys.readouterr().out


# ----------------------------------------------------------------------------- tune_axes

TUNED_AXES: dict[str, Any] = {
    **TINY,
    "tune_seeds": 1,
    "tune_axes": {"train_on_val": False},
    "axes": {**TINY["axes"], "seeds": 3, "train_on_val": True},
}


def test_tune_axes_give_a_sweep_tuning_runs_apart_from_its_table_runs() -> None:
    """The publication's setting (here: training on the validation images) for every table
    run; the sweep's tuning runs (seed 0 at every λ) alone take ``tune_axes``; the table runs
    are every seed, seed 0 included, at the chosen λ."""
    preset = peers.peer_preset_from_mapping(TUNED_AXES, "test")
    cells = preset.cells()
    tuning, held = tune.tuning_split(cells["MaSQ | task"], 1, preset.tune_axes)
    assert {(c.seed, c.lam, c.train_on_val) for c in tuning} == {
        (0, 1.0, False), (0, 10.0, False), (0, 100.0, False)
    }  # fmt: skip
    assert {(c.seed, c.train_on_val) for c in held} == {(0, True), (1, True), (2, True)}
    assert len(held) == 9  # every seed at every λ; only those at the chosen λ run
    assert {c.train_on_val for c in cells["EWC | task"]} == {True}  # one λ: no tuning runs
    assert tune.tuning_split(cells["EWC | task"], 1, preset.tune_axes)[1] == []
    assert tune.held_count(cells, 1, preset.tune_axes) == 2 * 3
    expected = tune.expected_runs(cells, 1, preset.tune_axes)
    assert expected["MaSQ | task"] == 3 + 3 and expected["EWC | task"] == 3
    first = preset.configs()
    assert {c.train_on_val for c in first if c.importance == "masq"} == {False}
    assert len(first) == 2 * 3 + 2 * 3 + 2 * 3  # None, EWC (3 seeds each), 2 sweeps of 3 λ
    untuned = dataclasses.replace(preset, tune_axes={})
    assert peer_manifest.definition(preset) != peer_manifest.definition(untuned)
    # tune_axes that the cells already have change nothing: tuning seeds as without them
    same = {**TUNED_AXES, "axes": {**TUNED_AXES["axes"], "train_on_val": False}}
    plain = peers.peer_preset_from_mapping(same, "test")
    tuning, held = tune.tuning_split(plain.cells()["MaSQ | task"], 1, plain.tune_axes)
    assert {c.seed for c in tuning} == {0} and {c.seed for c in held} == {1, 2}


@pytest.mark.parametrize(
    ("tune_axes", "problem"),
    [
        ({"lam": 1}, "tune_axes.lam: give fields of a run's configuration other than lam"),
        ({"scenario": "class"}, "other than lam, seed and the column field 'scenario'"),
        ({"train_on_val": [True, False]}, "tune_axes.train_on_val must be one value"),
        ({"train_on_vall": True}, "unknown grid key 'train_on_vall' in 'tune_axes'"),
        ([1], "'tune_axes' must be a table"),
    ],
)
def test_bad_tune_axes_are_one_line_errors(tune_axes: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        peers.peer_preset_from_mapping({**TUNED_AXES, "tune_axes": tune_axes}, "test")


def test_a_table_with_tune_axes_reads_its_table_runs_and_chooses_on_its_tuning_runs() -> None:
    """λ from seed 0's tuning runs (which fit no validation image); the mean ± SEM and the
    pairs from the table runs at that λ, seed 0's included; a table run at another λ counts
    for nothing, and the cell is partial until every seed's table run is stored."""
    preset = peers.peer_preset_from_mapping(TUNED_AXES, "test")
    tuning = frame_of({("MaSQ", "task"): [(1, 50, 10), (10, 80, 11), (100, 60, 12)]})
    tuning["seed"], tuning["train_on_val"] = 0, False
    table = frame_of({("MaSQ", "task"): [(10, math.nan, 70), (10, math.nan, 72),
                                         (10, math.nan, 74), (100, math.nan, 99)]})  # fmt: skip
    table["seed"], table["train_on_val"] = [0, 1, 2, 0], True
    table["run_id"] += "t"
    none = frame_of({("None", "task"): [(0, math.nan, 60), (0, math.nan, 61),
                                        (0, math.nan, 62)]})  # fmt: skip
    none["train_on_val"] = True
    frame = pd.concat([tuning, table, none], ignore_index=True)
    frame["expected"] = np.where(frame["method"] == "MaSQ", 6, 3)
    got = analysis.peer_table(frame, preset).set_index(["method", "column"])
    row = got.loc[("MaSQ", "task")]
    assert row["lam"] == 10.0 and row["lam_chosen_on_val"] and row["lams"] == 3
    assert row["mean"] == pytest.approx(72.0) and row["seeds"] == 3
    assert row["sem"] == pytest.approx(2 / math.sqrt(3))
    assert (row["runs"], row["expected"]) == (6, 6)
    assert got.loc[("None", "task"), "mean"] == pytest.approx(61.0)
    paired = analysis.paired_table(frame, preset).set_index("method")
    assert paired.loc["MaSQ", "pairs"] == 3 and paired.loc["MaSQ", "diff"] == pytest.approx(11)
    partial = frame[~((frame["seed"] == 2) & frame["train_on_val"])]
    row = analysis.peer_table(partial, preset).set_index(["method", "column"])
    assert row.loc[("MaSQ", "task"), "runs"] == 5  # seed 2's table run still to come
    assert analysis.paired_table(partial, preset).empty


def test_grid_then_peers_with_tune_axes_end_to_end(
    tmp_path: Path,
    tiny_data: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``masq grid --preset`` runs the sweep's tuning runs without the publication's setting,
    then every seed's table run at the chosen λ with it; ``masq peers`` reads them so."""
    data = {**TUNED_AXES, "name": "tuned", "rows": [TINY["rows"][0], TINY["rows"][2]],
            "axes": {**TUNED_AXES["axes"], "seeds": 2}}  # fmt: skip
    preset = peers.peer_preset_from_mapping(data, "test")
    monkeypatch.setattr(peers, "is_peer_preset", lambda name: name == "tuned")
    monkeypatch.setattr(peers, "load_peer_preset", lambda name: preset)
    res = tmp_path / "peers"
    res.mkdir()  # an empty directory: a dry run reads it as no runs stored
    argv = ["grid", "--preset", "tuned", "--results", str(res), "--scenario", "task",
            "--workers", "1", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "grid: 5 runs" in dry  # None on 2 seeds, the sweep's 3 λ on seed 0
    assert "then 2 runs: the table runs of each λ sweep at the λ chosen on its 1 tuning " in dry
    assert "run with train_on_val = False" in dry
    import fcntl
    import os

    choose = analysis.held_configs
    between: list[bool] = []

    def held_configs(*args: Any) -> Any:  # between the rounds: is the dir still locked?
        fd = os.open(res / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            between.append(False)
        except BlockingIOError:
            between.append(True)
        finally:
            os.close(fd)
        return choose(*args)

    monkeypatch.setattr(analysis, "held_configs", held_configs)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "done: 5 runs now" in out and "done: 2 runs now" in out
    assert between == [True]  # no other grid can take the dir between the two rounds
    assert main(["peers", "tuned", "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "7 of 14 runs stored" in out  # the class column (no grid ran it): not run yet
    assert "not run yet" in out and "partial:" not in out
    from masq.store import load

    df = load(res).set_index("run_id")
    masq_runs = df[df["importance"] == "masq"]
    assert sorted(masq_runs["train_on_val"].value_counts().items()) == [(False, 3), (True, 2)]
    table = pd.read_csv(res / "tuned" / "peers.csv").set_index("method")
    at = masq_runs[masq_runs["train_on_val"] & (masq_runs["lam"] == table.loc["MaSQ", "lam"])]
    assert table.loc["MaSQ", "seeds"] == 2
    assert table.loc["MaSQ", "mean"] == pytest.approx(100 * at["average_accuracy"].mean())
