"""masq.store: run ids, the atomic store, format versions and migration, loading as rows,
records verified before they count, checksummed tensor caches, writes that fail."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masq import fileio, migrate, runid, store
from masq.config import FIELDS, RunConfig, Stage
from masq.errors import ConfigError
from masq.grid import d1_key
from masq.protocol import Result, build_result
from masq.runid import run_id
from masq.store import Store

GOLDEN = Path(__file__).parent / "data" / "golden_t2_v1.json"
U2, U3 = "D1∪D2", "D1∪D2∪D3"

CHANGES: dict[str, Any] = {
    "slt": "D9-1",
    "dataset": "fashion-mnist",
    "scenario": "task",
    "seed": 3,
    "class_order": "seeded",
    "pad": 2,
    "hidden": (800, 400),
    "init": "tf",
    "lr1": 2e-3,
    "iters1": 10,
    "batch_size": 50,
    "adam_state": "keep",
    "eval_every": 7,
    "eval_val": True,
    "eval_schedule": "dense-early",
    "precision": "bf16",
    "importance": "fisher",
    "masq_batch": 1,
    "scale": "sum",
    "fisher_labels": "sampled",
    "fisher_samples": 500,
    "si_damping": 0.5,
    "si_gradient": "total",
    "class_units": "seen",
    "permute_first": True,
    "train_on_val": True,
    "consolidation": "online-ewc",
    "gamma": 0.5,
    "transfer": "drop",
    "transfer_lam": 0.1,
    "drop_p": 0.2,
    "alpha_step": 0.05,
    "lr2": 1e-4,
    "lam": 100.0,
    "iters2": 20,
}


def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- run ids


def test_every_field_but_the_run_fields_changes_the_id() -> None:
    base = RunConfig()
    id_fields = {f.name for f in FIELDS if f.stage != Stage.RUN}
    assert set(CHANGES) == id_fields  # a new field must be added here
    ids = {run_id(base)}
    for name, value in CHANGES.items():
        ids.add(run_id(base.with_(**{name: value})))
    assert len(ids) == len(CHANGES) + 1
    assert run_id(base.with_(device="cuda")) == run_id(base)
    assert run_id(base.with_(lam=1000)) == run_id(base.with_(lam=1000.0))  # int vs float
    assert run_id(base) == run_id(RunConfig())  # stable across instances
    assert len(run_id(base)) == runid.ID_LENGTH == 20


def test_run_id_is_sha256_of_the_sorted_config() -> None:
    """An independent spelling of the id rule: sha256 of the sorted, space-free JSON of every
    field but the device and the fields added since format 1 (at their defaults)."""
    config = RunConfig(slt="D9-1", hidden=(30, 20), lam=5.0, seed=2)
    d = config.to_dict()
    for name in ("device", "consolidation", "gamma", "eval_schedule", "precision", "transfer",
                 "transfer_lam", "drop_p", "alpha_step", "scenario", "fisher_samples",
                 "si_damping", "si_gradient", "adam_state", "class_order", "pad",
                 "permute_first", "train_on_val", "class_units"):  # fmt: skip
        del d[name]
    d["fisher_labels"] = "true"  # masq 0.1's name of the empirical Fisher, kept in ids
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert run_id(config) == hashlib.sha256(text.encode()).hexdigest()[:20]


def test_golden_run_ids_are_unchanged() -> None:
    gold = golden()
    entries = gold["separate"] + gold["stacked"]
    assert len(entries) == 10
    for entry in entries:
        raw = entry["result"]["config"]
        assert run_id(raw) == entry["run_id"]
        assert run_id(RunConfig.from_dict(raw)) == entry["run_id"]
        # the fields added since format 1, given at their defaults, leave the id as it was
        assert run_id({**raw, "consolidation": "ewc", "gamma": 1}) == entry["run_id"]
        assert run_id({**raw, "consolidation": "online-ewc"}) != entry["run_id"]
        assert run_id({**raw, "gamma": 0.5}) != entry["run_id"]


def test_fields_added_since_format_1_are_in_the_id_only_off_their_default() -> None:
    since = {f.name for f in FIELDS if f.since_v1}
    assert since == {"consolidation", "gamma", "eval_schedule", "precision", "transfer",
                     "transfer_lam", "drop_p", "alpha_step", "scenario", "fisher_samples",
                     "si_damping", "si_gradient", "adam_state", "class_order", "pad",
                     "permute_first", "train_on_val", "class_units"}  # fmt: skip
    base = RunConfig(slt="D3-3-4")
    assert runid.id_dict(base).keys() == {f.name for f in FIELDS} - {"device"} - since
    online = base.with_(consolidation="online-ewc", gamma=0.25)
    assert runid.id_dict(online)["consolidation"] == "online-ewc"
    assert runid.id_dict(online)["gamma"] == 0.25
    ids = {run_id(c) for c in (base, online, base.with_(gamma=0.25), base.with_(gamma=1.0))}
    assert len(ids) == 3  # gamma = 1.0 is the default: the same run as base


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_run_id_ignores_key_order(seed: int) -> None:
    config = RunConfig(seed=seed % 7, lam=float(seed % 13), gamma=(seed % 5) / 4)
    d = config.to_dict()
    keys = list(d)
    random.Random(seed).shuffle(keys)
    shuffled = {k: d[k] for k in keys}
    assert run_id(shuffled) == run_id(d) == run_id(config)
    assert runid.canonical_json(shuffled) == runid.canonical_json(config)


# ----------------------------------------------------------------------------- the store


def _result(config: RunConfig, acc: float = 0.5) -> Result:
    first = {"iteration": [0, 5], "D1": [0.1, 0.9], "D2": [0.0, 0.0], U2: [0.05, 0.45]}
    curve = {
        "iteration": [0, 5, 10],
        "D1": [0.9, 0.7, 0.6],
        "D2": [0.0, 0.5, 0.6],
        U2: [0.45, acc, 0.6],
    }
    return build_result(
        config,
        [first, curve],
        importance=None,
        train_seconds=[0.5, 1.5],
        importance_seconds=[0.25],
        meta={},
    )


def test_store_writes_atomically_and_loads(tmp_path: Path) -> None:
    st_ = Store(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta == {"format": "masq-results", "version": 2} and store.FORMAT_VERSION == 2
    a, b = RunConfig(hidden=(8,)), RunConfig(hidden=(8, 8), lam=0.0)
    rid = st_.write_result(_result(a, 0.8))
    st_.write_result(_result(b, 0.3))
    assert rid == run_id(a) and st_.has(rid) and st_.stored_ids() == {rid, run_id(b)}
    record = json.loads((tmp_path / "r" / "runs" / f"{rid}.json").read_text(encoding="utf-8"))
    assert record["run_id"] == rid and record["version"] == 2
    assert not list((tmp_path / "r").rglob("*.tmp"))
    df = store.load(tmp_path / "r")
    assert len(df) == 2 and set(df["run_id"]) == {rid, run_id(b)}
    row = df.set_index("run_id").loc[rid]
    assert row["hidden"] == "8" and row["layers"] == 1 and row["tasks"] == 2
    assert row[f"best.{U2}"] == row["best.union"] == 0.8 and row["best.iteration"] == 5
    assert row[f"last.{U2}"] == row["last.union"] == 0.6 and row["last.iteration"] == 10
    assert row["time.train"] == 2.0 and row["time.importance"] == 0.25
    # R = [[0.9, 0.0], [0.6, 0.6]]: ACC 0.6, BWT 0.6 - 0.9, forgetting 0.9 - 0.6
    assert row["average_accuracy"] == pytest.approx(0.6)
    assert row["bwt"] == pytest.approx(-0.3) and row["forgetting"] == pytest.approx(0.3)
    back = store.load_result(tmp_path / "r", rid)
    assert back.config == a and back.curves[1][U2] == [0.45, 0.8, 0.6]
    with pytest.raises(ConfigError, match="no run"):
        store.load_record(tmp_path / "r", "0" * 20)


def test_errors_are_recorded_and_cleared_by_success(tmp_path: Path) -> None:
    st_ = Store(tmp_path)
    config = RunConfig(seed=4)
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        rid = st_.write_error(config, err)
    (err_rec,) = store.errors(tmp_path)
    assert err_rec["run_id"] == rid and err_rec["error"] == "RuntimeError: boom"
    assert "Traceback" in err_rec["traceback"] and err_rec["config"]["seed"] == 4
    st_.write_result(_result(config))
    assert store.errors(tmp_path) == []


def test_other_format_versions_are_refused(tmp_path: Path) -> None:
    Store(tmp_path / "ok")
    future = tmp_path / "future"
    future.mkdir()
    (future / "meta.json").write_text('{"format": "masq-results", "version": 99}')
    with pytest.raises(ConfigError, match=r"format version 99.*reads version 2"):
        Store(future)
    with pytest.raises(ConfigError, match="format version 99"):
        store.load(future)
    with pytest.raises(ConfigError, match="unknown format version 99"):
        migrate.migrate(future)
    alien = tmp_path / "alien"
    (alien / "runs").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no meta\.json"):
        Store(alien)
    with pytest.raises(ConfigError, match=r"not a results directory \(no meta\.json\)"):
        migrate.migrate(alien)
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not a masq results directory"):
        Store(other)
    with pytest.raises(ConfigError, match="no results at"):
        store.load(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{nope")
    with pytest.raises(ConfigError, match="unreadable"):
        Store(broken)


# ----------------------------------------------------------------------------- migration


def write_v1_dir(root: Path) -> dict[str, dict[str, Any]]:
    """A results dir of format 1 (masq 0.1) holding the golden "stacked" records, with the
    timings and meta masq 0.1 wrote; returns {run id: old record}."""
    (root / "runs").mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"format": "masq-results", "version": 1}))
    old: dict[str, dict[str, Any]] = {}
    for entry in golden()["stacked"]:
        result = {
            **entry["result"],
            "timings": {"d1_train": 1.0, "importance": 2.0, "d2_train": 3.0},
            "meta": {},
        }
        record = {"run_id": entry["run_id"], "version": 1, "result": result}
        (root / "runs" / f"{entry['run_id']}.json").write_text(json.dumps(record))
        old[entry["run_id"]] = result
    return old


def _runs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "runs").glob("*.json"))}


def test_a_format_1_dir_is_refused_with_one_line_naming_migrate(tmp_path: Path) -> None:
    write_v1_dir(tmp_path / "old")
    for open_it in (Store, store.load, store.open_store):
        with pytest.raises(ConfigError) as info:
            open_it(tmp_path / "old")
        message = str(info.value)
        assert "\n" not in message and f"masq migrate {tmp_path / 'old'}" in message


def test_migrate_converts_every_record_and_keeps_the_numbers(tmp_path: Path) -> None:
    root = tmp_path / "old"
    old = write_v1_dir(root)
    assert migrate.migrate(root) == len(old) == 6
    assert json.loads((root / "meta.json").read_text()) == {
        "format": "masq-results",
        "version": 2,
    }
    for rid, before in old.items():
        record = json.loads((root / "runs" / f"{rid}.json").read_text(encoding="utf-8"))
        assert record["run_id"] == rid and record["version"] == 2
        new = record["result"]
        d1, d2 = before["curve_d1"], before["curve_d2"]
        assert new["config"] == before["config"]
        assert new["curves"] == [d1, d2]
        assert new["best"] == before["best"] and new["last"] == before["last"]
        r = [[d1["D1"][-1], d1["D2"][-1]], [d2["D1"][-1], d2["D2"][-1]]]
        assert new["accuracy"] == r
        assert new["metrics"]["average_accuracy"] == pytest.approx((r[1][0] + r[1][1]) / 2)
        assert new["metrics"]["bwt"] == pytest.approx(r[1][0] - r[0][0])
        assert new["metrics"]["forgetting"] == pytest.approx(r[0][0] - r[1][0])
        assert new["importance_summary"] == before["importance_summary"]
        assert new["timings"] == {"train": [1.0, 3.0], "importance": [2.0]}
        assert Result.from_dict(new).config == RunConfig.from_dict(before["config"])
    # idempotent: a second run converts nothing and rewrites nothing
    after = _runs(root)
    assert migrate.migrate(root) == 0
    assert _runs(root) == after
    # the DataFrame gives the golden best/last numbers
    df = store.load(root).set_index("run_id")
    assert set(df.index) == set(old)
    for rid, before in old.items():
        row = df.loc[rid]
        assert row["tasks"] == 2
        for crit in ("best", "last"):
            assert row[f"{crit}.union"] == before[crit][U2] == row[f"{crit}.{U2}"]
            assert row[f"{crit}.D1"] == before[crit]["D1"]
            assert row[f"{crit}.iteration"] == before[crit]["iteration"]
        d2_its, d2_val = before["curve_d2"]["iteration"], before["curve_d2"][f"val:{U2}"]
        assert row["best_val.val_union"] == max(d2_val[i] for i, it in enumerate(d2_its) if it)
        assert row["time.train"] == 4.0 and row["time.importance"] == 2.0


def test_an_interrupted_migration_finishes_when_run_again(tmp_path: Path) -> None:
    root = tmp_path / "old"
    old = write_v1_dir(root)
    reference = tmp_path / "ref"
    write_v1_dir(reference)
    migrate.migrate(reference)
    # interrupted: two records converted, meta.json (written last) still says format 1
    for rid in sorted(old)[:2]:
        text = (reference / "runs" / f"{rid}.json").read_text(encoding="utf-8")
        (root / "runs" / f"{rid}.json").write_text(text, encoding="utf-8")
    assert migrate.migrate(root) == len(old) - 2
    assert _runs(root) == _runs(reference)


# ----------------------------------------------------------------------------- rows


def _naive_best(iterations: list[int], values: list[float]) -> int:
    """The first index of the largest non-NaN value after iteration 0 (all if none)."""
    idx = [i for i, it in enumerate(iterations) if it > 0] or list(range(len(iterations)))
    finite = [i for i in idx if not math.isnan(values[i])] or idx
    best = finite[0]
    for i in finite:
        if values[i] > values[best]:
            best = i
    return best


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.sampled_from([0.1, 0.5, 0.9]), st.just(math.nan)), min_size=1, max_size=8
    ),
)
def test_validation_selection_follows_the_best_rule(values: list[float]) -> None:
    n = len(values)
    curve = {
        "iteration": [5 * i for i in range(n)],
        "D1": [0.5] * n,
        "D2": [0.25] * n,
        "val:D1": [0.0] * n,
        "val:D2": [0.0] * n,
        U2: [i / 100 for i in range(n)],
        f"val:{U2}": values,
    }
    config = RunConfig(eval_val=True)
    record = {"run_id": run_id(config), "version": 2, "result": _record(config, [curve, curve])}
    row = store.flat_row(record)
    best = _naive_best(curve["iteration"], values)
    assert row["best_val.iteration"] == 5 * best
    assert row["best_val.union"] == best / 100  # the test accuracy at the selected point
    assert row["last_val.iteration"] == 5 * (n - 1) and row["last_val.union"] == (n - 1) / 100


def _record(config: RunConfig, curves: list[dict[str, list[float]]]) -> dict[str, Any]:
    return build_result(
        config, curves, importance=None, train_seconds=[1.0] * len(curves),
        importance_seconds=[0.5], meta={},
    ).to_dict()  # fmt: skip


def test_validation_columns(tmp_path: Path) -> None:
    st_ = Store(tmp_path)
    config = RunConfig(eval_val=True)
    curve = {
        "iteration": [0, 5, 10],
        "D1": [0.9, 0.6, 0.5],
        "D2": [0.0, 0.5, 0.6],
        "val:D1": [0.9, 0.6, 0.5],
        "val:D2": [0.0, 0.9, 0.6],
        U2: [0.45, 0.55, 0.55],
        f"val:{U2}": [0.45, 0.75, 0.55],
    }
    st_.write_result(Result.from_dict(_record(config, [curve, curve])))
    row = store.load(tmp_path).iloc[0]
    assert row[f"best_val.val:{U2}"] == 0.75 and row[f"best_val.{U2}"] == 0.55
    assert row["best_val.val_union"] == 0.75 and row["best_val.union"] == 0.55
    assert row["best_val.iteration"] == 5 and row["last_val.iteration"] == 10


def test_a_run_that_trained_on_its_validation_images_selects_nothing_on_them() -> None:
    curve = {"iteration": [0, 5], "D1": [0.9, 0.6], "D2": [0.0, 0.5], "val:D1": [0.9, 0.7],
             "val:D2": [0.0, 0.9], U2: [0.45, 0.55], f"val:{U2}": [0.45, 0.8]}  # fmt: skip
    rows = {}
    for on in (False, True):
        config = RunConfig(eval_val=True, train_on_val=on)
        record = {"run_id": run_id(config), "version": 2, "result": _record(config, [curve] * 2)}
        rows[on] = store.flat_row(record)
    assert rows[False]["last_val.val_union"] == 0.8
    assert not [k for k in rows[True] if k.startswith(("best_val.", "last_val."))]
    assert rows[True]["last.union"] == rows[False]["last.union"] == 0.55  # test metrics stay


def test_flat_row_of_a_three_task_record() -> None:
    config = RunConfig(slt="D3-3-4", hidden=(30, 20), lam=10.0, consolidation="online-ewc",
                       gamma=0.5)  # fmt: skip
    phase1 = {"iteration": [0, 4], "D1": [0.1, 0.9], "D2": [0.0, 0.0], "D3": [0.0, 0.0],
              U3: [0.03, 0.3]}  # fmt: skip
    phase2 = {"iteration": [0, 4], "D1": [0.9, 0.7], "D2": [0.0, 0.8], "D3": [0.0, 0.0],
              U2: [0.45, 0.75], U3: [0.3, 0.5]}  # fmt: skip
    phase3 = {"iteration": [0, 2, 4], "D1": [0.7, 0.6, 0.4], "D2": [0.8, 0.6, 0.5],
              "D3": [0.0, 0.6, 0.9], U3: [0.5, 0.6, 0.6]}  # fmt: skip
    result = build_result(
        config, [phase1, phase2, phase3], importance=None, train_seconds=[1.0, 2.0, 3.0],
        importance_seconds=[0.5, 0.25], meta={},
    )  # fmt: skip
    row = store.flat_row({"run_id": run_id(config), "version": 2, "result": result.to_dict()})
    assert row["tasks"] == 3 and row["hidden"] == "30-20" and row["layers"] == 2
    assert row["consolidation"] == "online-ewc" and row["gamma"] == 0.5
    assert row["best.union"] == row[f"best.{U3}"] == 0.6 and row["best.iteration"] == 2
    assert row["last.union"] == row[f"last.{U3}"] == 0.6 and row["last.iteration"] == 4
    assert row["best.D3"] == 0.6 and row["last.D3"] == 0.9
    # R = [[0.9, 0, 0], [0.7, 0.8, 0], [0.4, 0.5, 0.9]]
    assert row["average_accuracy"] == pytest.approx((0.4 + 0.5 + 0.9) / 3)
    assert row["bwt"] == pytest.approx(((0.4 - 0.9) + (0.5 - 0.8)) / 2)
    assert row["forgetting"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.5)) / 2)
    assert row["time.train"] == 6.0 and row["time.importance"] == 0.75
    assert row["after_task1"] == "0.9|0.0|0.0"  # R's first row: what the task-1 state decides
    assert row["task1"] == d1_key(config)  # the grid's key of that state (d1 cache)
    later = dataclasses.replace(config, lam=1e3, gamma=0.9)  # settings of later phases only
    moved = dataclasses.replace(result, config=later).to_dict()
    other = store.flat_row({"run_id": run_id(later), "version": 2, "result": moved})
    assert other["task1"] == row["task1"] != d1_key(dataclasses.replace(config, seed=1))
    assert "best_val.union" not in row


# ----------------------------------------------------------------------------- verification


def _corruptions(valid: dict[str, Any], rid: str) -> dict[str, tuple[bytes, str]]:
    """{name: (file content, words of the reason)} of records that must not count as stored."""
    other = run_id(RunConfig(seed=99))
    wrong_config = json.loads(json.dumps(valid))
    wrong_config["result"]["config"]["seed"] = 99
    moved_id = run_id(RunConfig.from_dict(wrong_config["result"]["config"]))
    assert moved_id not in (rid, other)
    no_union = json.loads(json.dumps(valid))
    no_union["result"]["best"] = {"iteration": 5}
    bad_field = json.loads(json.dumps(valid))
    bad_field["result"]["config"]["hidden"] = "eight"
    text = json.dumps(valid)
    return {
        "truncated": (text[: len(text) // 2].encode(), "truncated or not JSON"),
        "empty object": (b"{}", "run_id None"),
        "random bytes": (b"\xff" + random.Random(1).randbytes(300), "not UTF-8 text"),
        "a list": (b"[1, 2]", "not a JSON object"),
        "another id": (json.dumps({**valid, "run_id": other}).encode(), "not its file name"),
        "version 1": (json.dumps({**valid, "version": 1}).encode(), "version 1"),
        "no result": (json.dumps({**valid, "result": {}}).encode(), "lacks ['config'"),
        "config of another run": (json.dumps(wrong_config).encode(), f"run id {moved_id}"),
        "no union in best": (json.dumps(no_union).encode(), "malformed result (KeyError"),
        "a bad field": (json.dumps(bad_field).encode(), "bad config"),
    }


def test_invalid_records_are_set_aside_with_a_warning_and_not_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "r"
    st_ = Store(root)
    good, bad = RunConfig(hidden=(8,)), RunConfig(hidden=(9,))
    st_.write_result(_result(good))
    rid = st_.write_result(_result(bad))
    valid = json.loads(st_.run_path(rid).read_text(encoding="utf-8"))
    assert st_.has(rid) and st_.stored_ids() == {rid, run_id(good)}
    for n, (name, (content, reason)) in enumerate(_corruptions(valid, rid).items()):
        st_.run_path(rid).write_bytes(content)
        fresh = Store(root)
        # a dry look (repair=False) leaves the file where it is
        assert fresh.stored_ids(repair=False) == {run_id(good)}, name
        assert fresh.run_path(rid).read_bytes() == content
        # the grid's look moves it aside, naming it and why, and does not count it
        assert fresh.stored_ids() == {run_id(good)}, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"masq: warning: {root / 'runs' / (rid + '.json')} is not a valid")
        assert reason in err and "\n" not in err and "run to be redone" in err, (name, err)
        assert not fresh.run_path(rid).exists() and not fresh.has(rid)
        moved = root / "invalid" / (f"{rid}.{n}.json" if n else f"{rid}.json")
        assert moved.read_bytes() == content  # kept, never overwritten
        assert f"moved to {moved};" in err
    assert len(list((root / "invalid").iterdir())) == len(_corruptions(valid, rid))
    # a valid record is checked once while it does not change
    calls = []
    real = store.check_record
    store.check_record = lambda path: calls.append(path) or real(path)  # type: ignore[assignment]
    try:
        assert Store(root).has(run_id(good))
        fresh = Store(root)
        assert fresh.has(run_id(good)) and fresh.has(run_id(good)) and len(calls) == 2
    finally:
        store.check_record = real  # type: ignore[assignment]


def test_load_refuses_any_invalid_record_in_one_line_naming_it(tmp_path: Path) -> None:
    st_ = Store(tmp_path)
    rid = st_.write_result(_result(RunConfig(hidden=(8,))))
    valid = json.loads(st_.run_path(rid).read_text(encoding="utf-8"))
    for name, (content, reason) in _corruptions(valid, rid).items():
        st_.run_path(rid).write_bytes(content)
        for read in (store.load, lambda root: store.load_record(root, rid)):
            with pytest.raises(ConfigError) as info:
                read(tmp_path)
            message = str(info.value)
            assert message.startswith(f"{st_.run_path(rid)}: not a valid run record"), name
            assert reason in message and "\n" not in message, (name, message)
    # errors/ too: a corrupt error record is one line naming it, not a UnicodeDecodeError
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "x.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"x\.json: corrupt record"):
        store.errors(tmp_path)


def test_result_keys_are_the_records_required_keys() -> None:
    from masq.protocol.result import REQUIRED_KEYS

    assert set(store.RESULT_KEYS) == REQUIRED_KEYS


def test_every_golden_record_is_valid(tmp_path: Path) -> None:
    """check_record against records written by the real protocol (the golden ones)."""
    from masq.protocol.result import result_from_v1

    st_ = Store(tmp_path)
    for entry in golden()["separate"]:
        st_.write_result(Result.from_dict(result_from_v1(entry["result"])))
    assert st_.stored_ids() == {e["run_id"] for e in golden()["separate"]}
    assert not (tmp_path / "invalid").exists()


# ----------------------------------------------------------------------------- tensors


def _payload() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    state = {"0.weight": torch.randn(3, 4, generator=g), "0.bias": torch.randn(3, generator=g)}
    curve = {"iteration": [0, 5], "D1": [0.1, 0.123456789012345678]}
    return {"config": RunConfig(hidden=(3,)).to_dict(), "state_dict": state, "curve": curve,
            "seconds": 1.5}  # fmt: skip


def test_tensors_round_trip_as_safetensors_with_a_checksummed_sidecar(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    st_ = Store(tmp_path)
    path = st_.d1 / "k.safetensors"
    payload = _payload()
    st_.save_tensors(path, payload)
    back = st_.load_tensors(path)
    assert back is not None and set(back) == set(payload)
    assert back["config"] == payload["config"] and back["curve"] == payload["curve"]
    assert back["seconds"] == 1.5
    assert all(torch.equal(back["state_dict"][k], v) for k, v in payload["state_dict"].items())
    # the file is a plain state dict any safetensors reader opens; the sidecar holds its hash
    plain = load_file(str(path))
    assert set(plain) == {"0.weight", "0.bias"}
    sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sidecar["bytes"] == path.stat().st_size
    # two tensor fields: keys <field>/<name>
    two = st_.importance / "two.safetensors"
    st_.save_tensors(two, {"a": {"x": torch.ones(2)}, "b": {"x": torch.zeros(1)}, "n": 1})
    assert set(load_file(str(two))) == {"a/x", "b/x"}
    both = st_.load_tensors(two)
    assert both is not None and torch.equal(both["b"]["x"], torch.zeros(1)) and both["n"] == 1
    assert st_.load_tensors(st_.d1 / "never.safetensors") is None  # absent: no warning


@pytest.mark.parametrize("damage", ["truncate", "flip", "no tensors", "no sidecar", "sidecar"])
def test_a_damaged_tensor_file_is_named_and_not_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    st_ = Store(tmp_path)
    path = st_.d1 / "k.safetensors"
    st_.save_tensors(path, _payload())
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":  # same size, one byte of a tensor changed
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    elif damage == "no tensors":
        path.unlink()
    elif damage == "no sidecar":
        path.with_suffix(".json").unlink()
    else:
        path.with_suffix(".json").write_text("{trunc")
    assert st_.load_tensors(path) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"masq: warning: cached tensors {path} are invalid (")
    assert err.endswith("recomputing") and "\n" not in err
    words = {"truncate": "truncated or changed", "flip": "truncated or changed",
             "no tensors": "k.safetensors is missing", "no sidecar": "k.json is missing",
             "sidecar": "Expecting"}  # fmt: skip
    assert words[damage] in err


def test_a_sidecar_matching_bytes_that_are_not_safetensors_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from masq.fileio import write_tensors

    path = tmp_path / "x.safetensors"
    write_tensors(path, {}, {"tensors": [], "meta": {}})
    garbage = b"not a safetensors file"
    path.write_bytes(garbage)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    assert Store(tmp_path / "r").load_tensors(path) is None
    assert "unreadable safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- writes that fail


def test_a_record_that_cannot_be_written_is_rescued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    st_ = Store(tmp_path / "r")
    real = store.atomic_write

    def full_disk(path: Any, data: Any) -> Path:
        if Path(path).parent == st_.runs:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(store, "atomic_write", full_disk)
    result = _result(RunConfig(hidden=(8,)), 0.75)
    with pytest.raises(store.NotStored) as info:
        st_.write_result(result)
    rid = run_id(result.config)
    rescued = info.value.rescued
    assert rescued is not None and rescued.is_relative_to(tmp_path / "tmp" / "masq-rescued")
    assert rescued == fileio.rescue_dir(tmp_path / "r") / "runs" / f"{rid}.json"
    record = json.loads(rescued.read_text(encoding="utf-8"))
    assert record["run_id"] == rid and Result.from_dict(record["result"]) == result
    err = capsys.readouterr().err.strip()
    assert err == (
        f"masq: warning: could not write {st_.run_path(rid)} (No space left on device); the "
        f"finished run was saved to {rescued} instead (copy it into {st_.runs} to keep it)"
    )
    assert not st_.has(rid)
    # copied back as told, it is a valid stored run
    monkeypatch.setattr(store, "atomic_write", real)
    st_.runs.mkdir(exist_ok=True)
    (st_.runs / rescued.name).write_bytes(rescued.read_bytes())
    assert Store(tmp_path / "r").stored_ids() == {rid}


def test_results_dirs_that_cannot_be_written_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from masq import fileio

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as info:
        Store(tmp_path / "file" / "sub")
    assert str(info.value) == (
        f"--results {str(tmp_path / 'file' / 'sub')!r} is under the regular file "
        f"{str(tmp_path / 'file')!r}; give a directory path"
    )
    with pytest.raises(ConfigError, match="is an existing file"):
        Store(tmp_path / "file")
    ok = Store(tmp_path / "ok")

    def denied(directory: Path) -> None:
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(fileio, "probe_write", denied)
    with pytest.raises(ConfigError) as info:
        ok.check_writable()
    assert str(info.value) == (
        f"--results {str(tmp_path / 'ok')!r} is not writable (Permission denied); give a "
        "writable directory"
    )
    with pytest.raises(ConfigError, match="not writable"):
        Store(tmp_path / "new")
    assert not (tmp_path / "new" / "meta.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_results_dir_is_refused(tmp_path: Path) -> None:
    st_ = Store(tmp_path / "r")
    st_.check_writable()
    st_.runs.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"runs'? is not writable \(Permission denied\)"):
            st_.check_writable()
    finally:
        st_.runs.chmod(0o755)


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    from masq.fileio import LockHeld, exclusive_lock

    lock = tmp_path / ".lock"
    with exclusive_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockHeld) as info, exclusive_lock(lock):
            pass  # a second open file: the same as another process
        assert info.value.pid == os.getpid()
    with exclusive_lock(lock):  # released at the end of the block
        pass
