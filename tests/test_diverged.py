"""A diverged run is stored as valid JSON, recorded as diverged and shown so in tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from masq import grid, protocol
from masq.config import RunConfig
from masq.protocol.result import finite_json
from masq.report import table1
from masq.store import Store, load

TINY = RunConfig(hidden=(8,), iters1=20, iters2=10, batch_size=25, masq_batch=50, eval_every=10,
                 lr2=1e-3, lam=10.0)  # fmt: skip


def strict(text: str) -> object:
    """JSON that refuses NaN and Infinity tokens (what other JSON readers do)."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_finite_json_replaces_every_non_finite_float() -> None:
    obj = {"a": [1.0, math.nan, {"b": math.inf, "c": -math.inf}], "d": 2, "e": "x"}
    assert finite_json(obj) == {"a": [1.0, None, {"b": None, "c": None}], "d": 2, "e": "x"}


def test_a_diverged_run_is_recorded_as_diverged_in_valid_json(
    data_learnable: None, tmp_path: Path
) -> None:
    result = protocol.run(TINY.with_(lr1=1e30))
    assert result.meta["diverged"] == "phase 1"
    record = strict(result.to_json())
    assert record["meta"]["diverged"] == "phase 1"  # type: ignore[index]
    healthy = protocol.run(TINY)
    assert "diverged" not in healthy.meta
    store = Store(tmp_path / "r")
    store.write_result(result)
    store.write_result(healthy)
    assert store.stored_ids() == {store.write_result(result), store.write_result(healthy)}
    df = load(tmp_path / "r")
    assert sorted(df["diverged"]) == ["", "phase 1"]
    marked = table1(df[df["diverged"] != ""])["method"]
    assert len(marked) == 2 and all(m.endswith("[diverged in 1 of 1]") for m in marked)
    assert not any("diverged" in m for m in table1(df[df["diverged"] == ""])["method"])


def test_a_diverged_grid_run_is_stored_and_marked(data_learnable: None, tmp_path: Path) -> None:
    configs = grid.expand(grid.grid_from_mapping(
        {"hidden": "8", "iters1": 20, "iters2": 10, "batch_size": 25, "masq_batch": 50,
         "eval_every": 10, "lr1": [1e30], "lr2": [1e-3], "lam": [0.0, 10.0]}))  # fmt: skip
    summary = grid.execute(configs, tmp_path, workers=1, stack=4, progress=False)
    assert summary.failed == {} and summary.done == 2
    for path in (tmp_path / "runs").glob("*.json"):
        record = strict(path.read_text(encoding="utf-8"))
        assert record["result"]["meta"]["diverged"] == "phase 1"  # type: ignore[index]
    assert all("[diverged in 1 of 1]" in m for m in table1(load(tmp_path))["method"])
