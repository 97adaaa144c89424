"""masq.results: run ids, the atomic store, format versions, loading as a DataFrame."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masq import experiment, results
from masq.errors import ConfigError
from masq.experiment import ExperimentConfig, Result
from masq.results import Store, run_id

CHANGES = {
    "slt": "D9-1",
    "dataset": "fashion-mnist",
    "hidden": (800, 400),
    "init": "tf",
    "lr1": 2e-3,
    "lr2": 1e-4,
    "lam": 100.0,
    "importance": "fisher",
    "masq_batch": 1,
    "scale": "sum",
    "fisher_labels": "sampled",
    "iters1": 10,
    "iters2": 20,
    "batch_size": 50,
    "eval_every": 7,
    "eval_val": True,
    "seed": 3,
}


def test_every_field_but_the_device_changes_the_id() -> None:
    base = ExperimentConfig()
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert set(CHANGES) == names - {"device"}  # a new field must be added here
    ids = {run_id(base)}
    for name, value in CHANGES.items():
        ids.add(run_id(base.with_(**{name: value})))
    assert len(ids) == len(CHANGES) + 1
    assert run_id(base.with_(device="cuda")) == run_id(base)
    assert run_id(base.with_(lam=1000)) == run_id(base.with_(lam=1000.0))  # int vs float
    assert run_id(base) == run_id(ExperimentConfig())  # stable across instances
    assert len(run_id(base)) == results.ID_LENGTH


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_run_id_ignores_key_order(seed: int) -> None:
    config = ExperimentConfig(seed=seed % 7, lam=float(seed % 13))
    d = config.to_dict()
    keys = list(d)
    random.Random(seed).shuffle(keys)
    shuffled = {k: d[k] for k in keys}
    assert run_id(shuffled) == run_id(d) == run_id(config)
    assert results.canonical_json(shuffled) == results.canonical_json(config)


def _result(config: ExperimentConfig, acc: float = 0.5) -> Result:
    curve = {
        "iteration": [0, 5, 10],
        "D1": [0.9, 0.7, 0.6],
        "D2": [0.0, 0.5, 0.6],
        "D1∪D2": [0.45, acc, 0.6],
    }
    best, last = experiment.best_and_last(curve)
    return Result(
        config, {"iteration": [0], "D1": [0.1]}, curve, best, last, timings={"d2_train": 1.5}
    )


def test_store_writes_atomically_and_loads(tmp_path: Path) -> None:
    store = Store(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta == {"format": "masq-results", "version": results.FORMAT_VERSION}
    a, b = ExperimentConfig(hidden=(8,)), ExperimentConfig(hidden=(8, 8), lam=0.0)
    rid = store.write_result(_result(a, 0.8))
    store.write_result(_result(b, 0.3))
    assert rid == run_id(a) and store.has(rid) and store.stored_ids() == {rid, run_id(b)}
    assert not list((tmp_path / "r").rglob("*.tmp"))
    df = results.load(tmp_path / "r")
    assert len(df) == 2 and set(df["run_id"]) == {rid, run_id(b)}
    row = df.set_index("run_id").loc[rid]
    assert row["hidden"] == "8" and row["layers"] == 1 and row["best.D1∪D2"] == 0.8
    assert row["last.D1∪D2"] == 0.6 and row["best.iteration"] == 5 and row["time.d2_train"] == 1.5
    back = results.load_result(tmp_path / "r", rid)
    assert back.config == a and back.curve_d2["D1∪D2"] == [0.45, 0.8, 0.6]
    with pytest.raises(ConfigError, match="no run"):
        results.load_record(tmp_path / "r", "0" * 20)


def test_errors_are_recorded_and_cleared_by_success(tmp_path: Path) -> None:
    store = Store(tmp_path)
    config = ExperimentConfig(seed=4)
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        rid = store.write_error(config, err)
    (err_rec,) = results.errors(tmp_path)
    assert err_rec["run_id"] == rid and err_rec["error"] == "RuntimeError: boom"
    assert "Traceback" in err_rec["traceback"] and err_rec["config"]["seed"] == 4
    store.write_result(_result(config))
    assert results.errors(tmp_path) == []


def test_other_format_versions_are_refused(tmp_path: Path) -> None:
    Store(tmp_path / "ok")
    future = tmp_path / "future"
    future.mkdir()
    (future / "meta.json").write_text('{"format": "masq-results", "version": 99}')
    with pytest.raises(ConfigError, match=r"format version 99.*reads version 1"):
        Store(future)
    with pytest.raises(ConfigError, match="format version 99"):
        results.load(future)
    alien = tmp_path / "alien"
    (alien / "runs").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no meta\.json"):
        Store(alien)
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not a masq results directory"):
        Store(other)
    with pytest.raises(ConfigError, match="no results at"):
        results.load(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{nope")
    with pytest.raises(ConfigError, match="unreadable"):
        Store(broken)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.sampled_from([0.1, 0.5, 0.9]), st.just(math.nan)), min_size=1, max_size=8
    ),
)
def test_curve_points_match_best_and_last(values: list[float]) -> None:
    curve = {
        "iteration": [5 * i for i in range(len(values))],
        "val:D1∪D2": values,
        "D1∪D2": values[::-1],
    }
    best, last = experiment.best_and_last(curve, key="val:D1∪D2")
    i_best, i_last = results.curve_points(curve, "val:D1∪D2")
    assert results.point(curve, i_best)["iteration"] == best["iteration"]
    assert results.point(curve, i_last)["iteration"] == last["iteration"]


def test_validation_columns(tmp_path: Path) -> None:
    store = Store(tmp_path)
    config = ExperimentConfig(eval_val=True)
    curve = {
        "iteration": [0, 5, 10],
        "D1": [0.9, 0.6, 0.5],
        "D2": [0.0, 0.5, 0.6],
        "val:D1": [0.9, 0.6, 0.5],
        "val:D2": [0.0, 0.9, 0.6],
        "D1∪D2": [0.45, 0.55, 0.55],
        "val:D1∪D2": [0.45, 0.75, 0.55],
    }
    best, last = experiment.best_and_last(curve)
    store.write_result(Result(config, {}, curve, best, last))
    row = results.load(tmp_path).iloc[0]
    assert row["best_val.val:D1∪D2"] == 0.75 and row["best_val.D1∪D2"] == 0.55
    assert row["best_val.iteration"] == 5 and row["last_val.iteration"] == 10
