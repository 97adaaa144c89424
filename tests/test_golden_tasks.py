"""T-task runs (T = 3, every consolidation method and importance) reproduce the numbers of the
code before the method and measure registries, to the last digit.

tests/data/golden_t3_v2.json holds records (without timings and meta) made on the CPU with the
default thread count on :func:`tests.synthetic.learnable_dataset`, with their run ids and the
cache keys of their task-1 state and importance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from masq import protocol as pr
from masq.config import RunConfig
from masq.grid.plan import d1_key, importance_key
from masq.runid import run_id

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_t3_v2.json").read_text("utf-8"))
COMPARED = ("curves", "best", "last", "accuracy", "metrics", "importance_summary", "imm")


def test_golden_file_covers_every_method_and_measure() -> None:
    configs = [r["result"]["config"] for r in GOLDEN["records"]]
    assert {c["consolidation"] for c in configs} == {"ewc", "online-ewc", "mean-imm", "mode-imm"}
    assert {c["importance"] for c in configs} == {"fisher", "masq", "none"}
    assert {c["fisher_labels"] for c in configs} == {"true", "sampled", "exact"}
    for rec in GOLDEN["records"]:  # curves that move: exact equality is a real check
        assert len(set(rec["result"]["curves"][-1]["iteration"])) > 1
        assert len(set(rec["result"]["curves"][1][next(iter(rec["result"]["curves"][1]))])) >= 1


@pytest.mark.parametrize("record", GOLDEN["records"], ids=lambda r: r["run_id"])
def test_t_task_runs_reproduce_the_golden_records_exactly(
    data_learnable: None, record: dict[str, Any]
) -> None:
    golden = record["result"]
    config = RunConfig.from_dict(golden["config"])
    assert run_id(config) == record["run_id"]
    assert d1_key(config) == record["d1_key"]
    assert importance_key(config) == record["importance_key"]
    got = json.loads(json.dumps(pr.run(config).to_dict()))
    for key in COMPARED:
        assert got.get(key) == golden.get(key), key
