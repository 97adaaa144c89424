"""masq.grid: expansion, canonical configs, shared work, chunks, resume, fail-fast, CUDA
out-of-memory halving, executors and the time estimate."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import masq.data
import masq.fileio
from masq import grid, protocol
from masq import tasks as masq_tasks
from masq.config import RunConfig, round_sig
from masq.errors import ConfigError
from masq.grid import Grid, GridAborted, GroupJob, canonical, chunks, execute, expand
from masq.grid.plan import one_by_one
from masq.protocol import stream_seed
from masq.runid import run_id
from masq.store import Store
from tests.synthetic import learnable_dataset, synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "golden_t2_v1.json"
# masq.grid re-exports functions named like their modules (estimate, expand, plan): reach the
# modules through importlib.
group_module = importlib.import_module("masq.grid.group")
estimate_module = importlib.import_module("masq.grid.estimate")
U2, U3 = "D1∪D2", "D1∪D2∪D3"


def synthetic_tasks(config: RunConfig) -> list[masq_tasks.Task]:
    """The tasks of ``config`` built from the tiny synthetic dataset (importable by workers)."""
    data = synthetic_dataset(300, 60, 100)
    return masq_tasks.make(config.slt, dataset=data, seed=stream_seed(config.seed, "tasks"))


def tiny_grid(**changes: object) -> Any:
    """A small grid of tiny nets: 2 architectures x 2 lr2 x 3 lam = 12 runs, 2 task-1 groups."""
    values: dict[str, object] = dict(
        slt=("D5-5",),
        hidden=((8,), (6, 4)),
        iters1=(12,),
        iters2=(10,),
        batch_size=(20,),
        eval_every=(5,),
        masq_batch=(50,),
        lr2=(1e-2, 1e-3),
        lam=(0.0, 10.0, 1000.0),
    )
    values.update(changes)
    return Grid(**values)


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    """Each test leaves torch's thread count as it found it (grids set it per worker)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(configs: list[RunConfig], root: Path, stack: int = 4, **kw: Any) -> grid.Summary:
    kw.setdefault("tasks_fn", synthetic_tasks)
    return execute(configs, root, stack=stack, progress=False, threads=1, **kw)


# ----------------------------------------------------------------------------- expansion


def test_paper_preset_is_the_papers_grid() -> None:
    paper = grid.load_preset("paper")
    configs = expand(paper)
    assert len(configs) == 3 * 36 * 4 * 4 == paper.size()
    assert len({c.hidden for c in configs}) == 36
    assert {len(c.hidden) for c in configs} == {2, 3}
    assert {c.slt for c in configs} == {"D5-5", "D9-1", "DP10-10"}
    assert {c.lr2 for c in configs} == {1e-3, 1e-4, 1e-5, 1e-6}
    assert {c.lam for c in configs} == {0.0, 100.0, 1000.0, 10000.0}
    assert {(c.iters1, c.iters2, c.lr1, c.batch_size) for c in configs} == {(5000, 5000, 1e-3, 100)}
    masq_runs = [c for c in configs if c.lam > 0]
    assert {(c.importance, c.masq_batch, c.scale) for c in masq_runs} == {("masq", 1000, "mean")}
    assert {c.importance for c in configs if c.lam == 0} == {"none"}
    assert {(c.consolidation, c.gamma) for c in configs} == {("ewc", 1.0)}
    groups = grid.plan(configs)
    assert len(groups) == 108 and all(len(g.configs) == 16 for g in groups)
    assert grid.work(groups, 16) == grid.Work(1728, 108, 108, 1728, 108)
    assert "paper" in grid.list_presets()


def test_architectures_counts() -> None:
    archs = grid.architectures((2, 3), (200, 400, 800))
    assert len(archs) == 36 and len(set(archs)) == 36
    assert (800, 400, 400) in archs and (200, 800) in archs


_axis = st.lists(st.integers(1, 50), min_size=1, max_size=3, unique=True)


@settings(max_examples=40, deadline=None)
@given(
    slts=st.lists(st.sampled_from(["D5-5", "D9-1", "DP10-10"]), min_size=1, unique=True),
    archs=st.lists(
        st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    lr2=st.lists(st.sampled_from([1e-2, 1e-3, 1e-4, 1e-5]), min_size=1, unique=True),
    lam=st.lists(st.sampled_from([1.0, 10.0, 100.0, 1e3, 1e4]), min_size=1, unique=True),
    seeds=st.integers(1, 3),
    inits=st.lists(st.sampled_from(["torch", "tf"]), min_size=1, unique=True),
    scales=st.lists(st.sampled_from(["mean", "sum"]), min_size=1, unique=True),
    batches=_axis,
)
def test_expansion_size_is_the_product_of_the_axes(
    slts: list[str],
    archs: list[tuple[int, ...]],
    lr2: list[float],
    lam: list[float],
    seeds: int,
    inits: list[str],
    scales: list[str],
    batches: list[int],
) -> None:
    g = Grid(
        slt=tuple(slts),
        hidden=tuple(archs),
        lr2=tuple(lr2),
        lam=tuple(lam),
        seed=tuple(range(seeds)),
        init=tuple(inits),
        scale=tuple(scales),
        masq_batch=tuple(batches),
    )
    configs = expand(g)
    expected = math.prod(map(len, (slts, archs, lr2, lam, inits, scales, batches))) * seeds
    assert len(configs) == g.size() == expected
    assert len({run_id(c) for c in configs}) == expected
    # runs of one task-1 group are contiguous
    keys = [grid.d1_key(c) for c in configs]
    assert (
        len(grid.plan(configs))
        == len(dict.fromkeys(keys))
        == len([k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k])
    )


@settings(max_examples=30, deadline=None)
@given(
    slts=st.lists(st.sampled_from(["D3-3-4", "D2-2-2-2-2", "DP10-10-10"]), min_size=1, unique=True),
    lam=st.lists(st.sampled_from([1.0, 10.0, 1e3]), min_size=1, unique=True),
    consolidations=st.lists(st.sampled_from(["ewc", "online-ewc"]), min_size=1, unique=True),
    gammas=st.lists(st.sampled_from([1.0, 0.9, 0.5, 0.0]), min_size=1, unique=True),
    lr2=st.lists(st.sampled_from([1e-2, 1e-3]), min_size=1, unique=True),
)
def test_expansion_of_t_task_grids_with_online_ewc(
    slts: list[str],
    lam: list[float],
    consolidations: list[str],
    gammas: list[float],
    lr2: list[float],
) -> None:
    """With T > 2 tasks γ is an axis of the online-EWC runs only (EWC ignores it)."""
    g = Grid(
        slt=tuple(slts),
        lam=tuple(lam),
        consolidation=tuple(consolidations),
        gamma=tuple(gammas),
        lr2=tuple(lr2),
    )
    configs = expand(g)
    per_point = ("ewc" in consolidations) + ("online-ewc" in consolidations) * len(gammas)
    assert len(configs) == len(slts) * len(lam) * len(lr2) * per_point
    assert g.size() == len(slts) * len(lam) * len(lr2) * len(consolidations) * len(gammas)
    assert all(c.gamma == 1.0 for c in configs if c.consolidation == "ewc")
    assert len({run_id(c) for c in configs}) == len(configs)


@settings(max_examples=40, deadline=None)
@given(
    lams=st.lists(st.sampled_from([0.0, 1.0, 10.0, 1e3]), min_size=1, unique=True),
    kinds=st.lists(st.sampled_from(["masq", "fisher"]), min_size=1, unique=True),
    scales=st.lists(st.sampled_from(["mean", "sum"]), min_size=1, unique=True),
    labels=st.lists(st.sampled_from(["true", "sampled", "exact"]), min_size=1, unique=True),
    lr2=st.lists(st.sampled_from([1e-2, 1e-3, 1e-4]), min_size=1, unique=True),
    consolidations=st.lists(st.sampled_from(["ewc", "online-ewc"]), min_size=1, unique=True),
)
def test_lambda_zero_and_irrelevant_fields_are_merged(
    lams: list[float],
    kinds: list[str],
    scales: list[str],
    labels: list[str],
    lr2: list[float],
    consolidations: list[str],
) -> None:
    g = Grid(
        lam=tuple(lams),
        importance=tuple(kinds),
        scale=tuple(scales),
        fisher_labels=tuple(labels),
        lr2=tuple(lr2),
        consolidation=tuple(consolidations),  # two tasks: online EWC is EWC
    )
    configs = expand(g)
    per_kind = {"masq": len(scales), "fisher": len(labels)}
    n_imp = sum(per_kind[k] for k in kinds)
    nonzero = len([v for v in lams if v > 0])
    expected = len(lr2) * (nonzero * n_imp + (1 if 0.0 in lams else 0))
    assert len(configs) == expected
    zero = [c for c in configs if c.lam == 0]
    assert all(c.importance == "none" for c in zero)
    assert len(zero) == (len(lr2) if 0.0 in lams else 0)
    assert all(c.fisher_labels == "empirical" for c in configs if c.importance == "masq")
    assert all(c.scale == "mean" for c in configs if c.importance == "fisher")
    assert {c.consolidation for c in configs} == {"ewc"}


def test_canonical() -> None:
    t5 = RunConfig(
        slt="D2-2-2-2-2",
        hidden=(30,),
        lr2=3e-3,
        seed=2,
        lam=0.0,
        importance="fisher",
        fisher_labels="sampled",
        masq_batch=7,
        scale="sum",
        consolidation="online-ewc",
        gamma=0.5,
    )
    # λ = 0: importance "none" and every importance and consolidation setting at its default
    assert canonical(t5) == RunConfig(slt="D2-2-2-2-2", hidden=(30,), lr2=3e-3, seed=2, lam=0.0,
                                      importance="none")  # fmt: skip
    # importance "none" at λ > 0 is the λ = 0 run
    assert canonical(t5.with_(lam=5.0, importance="none")) == canonical(t5)
    # only the fields of the importance kind in use stay
    masq_run = canonical(t5.with_(lam=5.0, importance="masq"))
    assert (masq_run.masq_batch, masq_run.scale, masq_run.fisher_labels) == (7, "sum", "empirical")
    fisher_run = canonical(t5.with_(lam=5.0))
    assert (fisher_run.masq_batch, fisher_run.scale, fisher_run.fisher_labels) == (
        1000,
        "mean",
        "sample",
    )
    # batched labels: the pass's batch size is the Fisher's b, so it stays
    batched = canonical(t5.with_(lam=5.0, fisher_labels="batched"))
    assert (batched.masq_batch, batched.fisher_labels) == (7, "batched")
    # T = 3: online EWC and its γ are kept; EWC resets γ
    t3 = RunConfig(slt="D3-3-4", lam=10.0, consolidation="online-ewc", gamma=0.5)
    assert canonical(t3) == t3
    assert canonical(t3.with_(consolidation="ewc")) == t3.with_(consolidation="ewc", gamma=1.0)
    # T = 2: online EWC is EWC (one anchor, F = F_1), and γ goes with it
    t2 = t3.with_(slt="D5-5")
    assert canonical(t2) == t2.with_(consolidation="ewc", gamma=1.0)
    assert canonical(t2).consolidation == "ewc"
    for config in (t5, t3, t2, masq_run, fisher_run):
        assert canonical(canonical(config)) == canonical(config)


def test_lambda_relative_to_lr2_and_both_readings() -> None:
    g = Grid(lr2=(1e-3, 1e-4), lam=(), lam_per_lr2=(0.0, 0.1, 1.0, 10.0))
    lams = {(c.lr2, c.lam) for c in expand(g)}
    assert lams == {
        (1e-3, 0.0),
        (1e-3, 100.0),
        (1e-3, 1000.0),
        (1e-3, 10000.0),
        (1e-4, 0.0),
        (1e-4, 1000.0),
        (1e-4, 10000.0),
        (1e-4, 100000.0),
    }
    both = Grid(lr2=(1e-3,), lam=(0.0, 100.0, 1000.0, 10000.0), lam_per_lr2=(0.0, 0.1, 1.0, 10.0))
    assert len(expand(both)) == 4  # at ε2 = 1e-3 both readings are the same four runs
    assert grid.lam_values(both, 1e-4) == [0.0, 100.0, 1000.0, 10000.0, 0.0, 1000.0, 1e4, 1e5]
    assert round_sig(1 / 1e-5) == 100000.0 and 1 / 1e-5 != 100000.0


def test_grid_from_mapping_and_errors(tmp_path: Path) -> None:
    base = grid.load_preset("paper")
    g = grid.grid_from_mapping({"slt": "D9-1", "seeds": 3, "hidden": ["800-400-400", [200]]}, base)
    assert g.slt == ("D9-1",) and g.seed == (0, 1, 2)
    assert g.hidden == ((800, 400, 400), (200,))
    assert g.lr2 == base.lr2  # untouched axes keep the preset's values
    g2 = grid.grid_from_mapping({"lam_per_lr2": [0, 1]}, base)
    assert g2.lam == () and g2.lam_per_lr2 == (0.0, 1.0)  # one λ reading replaces the other
    g3 = grid.grid_from_mapping({"layers": 2, "sizes": [10, 20]}, base)
    assert g3.hidden == ((10, 10), (10, 20), (20, 10), (20, 20))
    g4 = grid.grid_from_mapping({"consolidation": ["ewc", "online-ewc"], "gamma": [1, 0.5]})
    assert g4.consolidation == ("ewc", "online-ewc") and g4.gamma == (1.0, 0.5)
    with pytest.raises(ConfigError, match="unknown grid key 'lr3'"):
        grid.grid_from_mapping({"lr3": [1.0]})
    with pytest.raises(ConfigError, match="axis 'lr2' is empty"):
        grid.grid_from_mapping({"lr2": []})
    with pytest.raises(ConfigError, match="axis 'lam' is empty"):
        grid.grid_from_mapping({"lam": []})
    with pytest.raises(ConfigError, match="takes float values"):
        grid.grid_from_mapping({"lr2": ["fast"]})
    with pytest.raises(ConfigError, match=r"unknown consolidation method 'plain'.*ewc, joint"):
        grid.grid_from_mapping({"consolidation": ["plain"]})
    with pytest.raises(ConfigError, match="either 'seeds'"):
        grid.grid_from_mapping({"seeds": 2, "seed": [1]})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        grid.load_preset("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('slt = ["D5-5"]\nlr2 = [1e-3,\nlam = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml.*malformed TOML.*line 3"):
        grid.load_grid_file(bad)
    good = tmp_path / "good.toml"
    good.write_text(
        'slt = ["D5-5", "D9-1"]\nlr2 = [1e-3]\nimportance = ["masq", "fisher"]\n', encoding="utf-8"
    )
    assert grid.load_grid_file(good, base).slt == ("D5-5", "D9-1")
    with pytest.raises(ConfigError, match="unknown importance measure 'adam'"):
        expand(Grid(importance=("adam",)))
    with pytest.raises(ConfigError, match="gamma: must be between 0 and 1"):
        expand(Grid(slt=("D3-3-4",), consolidation=("online-ewc",), gamma=(1.5,)))


# ----------------------------------------------------------------------------- plan


def test_cache_keys_of_the_golden_runs_are_unchanged() -> None:
    entries = json.loads(GOLDEN.read_text(encoding="utf-8"))
    configs = {e["run_id"]: e["result"]["config"] for e in entries["separate"]}
    for keys in entries["cache_keys"]:
        config = RunConfig.from_dict(configs[keys["run_id"]])
        assert grid.d1_key(config) == keys["d1_key"]
        assert grid.importance_key(config) == keys["importance_key"]
    # the later-phase fields do not reach the task-1 and importance keys
    config = RunConfig.from_dict(configs[entries["cache_keys"][0]["run_id"]])
    online = config.with_(slt="D5-5", consolidation="online-ewc", gamma=0.5, lam=3.0, lr2=0.1)
    assert grid.d1_key(online) == grid.d1_key(config)
    assert grid.importance_key(online) == grid.importance_key(config)


def test_a_measures_layout_version_is_part_of_its_cache_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from masq.importance import registry

    config = RunConfig(slt="D5-5", importance="fisher-blocks", fisher_labels="exact")
    blocks = registry.get_measure("fisher-blocks")
    assert blocks.layout == 2  # its low-rank layout changed once
    key = grid.importance_key(config)
    old = dataclasses.replace(blocks, layout=1)
    monkeypatch.setitem(registry.MEASURES, "fisher-blocks", old)
    assert grid.importance_key(config) != key  # an older cache entry is not read back


def test_chunks_stack_runs_by_tasks_and_iters2() -> None:
    two = [RunConfig(lam=float(i), iters2=10) for i in range(5)]
    two_long = [RunConfig(lam=float(i), iters2=20) for i in range(2)]
    three = [RunConfig(slt="D3-3-4", lam=float(i), iters2=10) for i in range(3)]
    mixed = [two[0], three[0], two[1], two_long[0], two[2], three[1], two[3], two_long[1]]
    mixed += [two[4], three[2]]
    assert chunks(mixed, 2) == [
        [two[0], two[1]],
        [two[2], two[3]],
        [two[4]],
        [three[0], three[1]],
        [three[2]],
        [two_long[0], two_long[1]],
    ]
    assert chunks(three, 16) == [three]
    assert chunks([*three, three[0].with_(importance="kfac")], 16) == [
        three,
        [three[0].with_(importance="kfac")],
    ]
    assert chunks(two, 1) == [[c] for c in two]


def test_work_counts_shared_task_1_states_and_importance_passes() -> None:
    configs = expand(tiny_grid(importance=("masq", "fisher")))
    assert len(configs) == 20  # 2 archs x 2 lr2 x (1 λ = 0 + 2 λ x 2 kinds)
    groups = grid.plan(configs)
    assert [len(g.configs) for g in groups] == [10, 10]
    assert [len(g.importance_keys) for g in groups] == [2, 2]
    assert grid.work(groups, 4) == grid.Work(20, 2, 4, 20, 6)  # chunks of 4 + 4 + 2 per group
    three = expand(tiny_grid(slt=("D3-3-4",), consolidation=("ewc", "online-ewc")))
    assert len(three) == 20  # λ = 0 once per lr2, EWC and online EWC for λ > 0
    assert grid.work(grid.plan(three), 4) == grid.Work(20, 2, 2, 20, 6)  # stacked as two-task runs
    # runs that go alone are counted as such: SI (its own phase 1) and K-FAC (not stacked)
    alone = [three[1].with_(importance="si", slt="D3-3-4"), three[1].with_(importance="kfac")]
    w = grid.work(grid.plan([*configs[:4], *alone]), 4)
    assert (w.later_runs, w.stacks, w.one_by_one) == (6, 3, 2)
    assert w.text(4).endswith("6 runs in 3 stacks of <= 4, of which 2 one by one")
    assert "one by one" not in grid.work(groups, 4).text(4)


# ----------------------------------------------------------------------------- execution


class Counter:
    """Wraps the stage functions of masq.protocol that masq.grid calls and counts calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.d1: list[str] = []
        self.importance: list[str] = []
        self.stacks: list[int] = []
        self.singles = 0
        real_d1, real_imp = protocol.train_first, protocol.compute_importance
        real_stacked, real_run = protocol.continue_stacked, protocol.continue_run

        def train_first(config: RunConfig, tasks: list, **kw: Any) -> protocol.D1State:
            self.d1.append(grid.d1_key(config))
            return real_d1(config, tasks, **kw)

        def compute_importance(config: RunConfig, d1: Any, tasks: list) -> Any:
            assert config.importance != "none"
            self.importance.append(grid.importance_key(config))
            return real_imp(config, d1, tasks)

        def continue_stacked(configs: list, *a: Any, **kw: Any) -> list:
            self.stacks.append(len(configs))
            return real_stacked(configs, *a, **kw)

        def continue_run(config: RunConfig, *a: Any, **kw: Any) -> Any:
            self.singles += 1
            return real_run(config, *a, **kw)

        monkeypatch.setattr(protocol, "train_first", train_first)
        monkeypatch.setattr(protocol, "compute_importance", compute_importance)
        monkeypatch.setattr(protocol, "continue_stacked", continue_stacked)
        monkeypatch.setattr(protocol, "continue_run", continue_run)

    @property
    def later(self) -> int:
        return sum(self.stacks) + self.singles


def _records(root: Path) -> dict[str, dict]:
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8"))["result"]
        for p in (root / "runs").glob("*.json")
    }


def test_shared_d1_and_importance_are_computed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = Counter(monkeypatch)
    configs = expand(tiny_grid(importance=("masq", "fisher")))
    assert len(configs) == 20
    summary = _run(configs, tmp_path)
    assert summary.done == 20 and summary.total == 20 and not summary.failed
    assert summary.d1_trained == 2 and summary.importance_computed == 4
    assert sorted(count.d1) == sorted({grid.d1_key(c) for c in configs})  # one per group
    assert len(count.d1) == 2
    assert len(count.importance) == 4 == len(set(count.importance))  # 2 groups x 2 kinds
    assert count.stacks == [4, 4, 2, 4, 4, 2] and count.singles == 0
    assert len(list((tmp_path / "d1").glob("*.safetensors"))) == 2
    assert len(list((tmp_path / "importance").glob("*.safetensors"))) == 4
    # every record of a group starts from the same task-1 curve
    recs = _records(tmp_path)
    assert set(recs) == {run_id(c) for c in configs}
    by_arch: dict[tuple, list] = {}
    for r in recs.values():
        assert len(r["curves"]) == 2
        by_arch.setdefault(tuple(r["config"]["hidden"]), []).append(r["curves"][0])
    assert all(all(c == curves[0] for c in curves) for curves in by_arch.values())
    # a second identical call does nothing at all
    again = _run(configs, tmp_path)
    assert again.done == 0 and again.skipped == 20
    assert len(count.d1) == 2 and count.later == 20


def test_resume_after_a_crash_recomputes_nothing_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = expand(tiny_grid())
    assert len(configs) == 12
    real = protocol.continue_stacked
    calls = {"n": 0}

    def crash_on_third(*a: Any, **kw: Any) -> list:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a crash: not caught per run, stops the whole grid
        return real(*a, **kw)

    monkeypatch.setattr(protocol, "continue_stacked", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(configs, tmp_path, stack=3)
    stored = _records(tmp_path)
    assert len(stored) == 6  # two stacks of 3 finished before the crash
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json")}
    monkeypatch.setattr(protocol, "continue_stacked", real)
    count = Counter(monkeypatch)
    summary = _run(configs, tmp_path, stack=3)
    assert summary.skipped == 6 and summary.done == 6 and not summary.failed
    assert count.later == 6  # only the missing runs
    assert count.d1 == [] and count.importance == []  # both groups: task 1 and importance cached
    after = {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json")}
    assert all(after[name] == data for name, data in before.items())  # nothing rewritten
    assert set(_records(tmp_path)) == {run_id(c) for c in configs}
    assert not list(tmp_path.rglob("*.tmp"))


def test_invalid_records_are_moved_aside_and_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configs = expand(tiny_grid())
    _run(configs, tmp_path, stack=6)
    original = _records(tmp_path)
    runs = sorted((tmp_path / "runs").glob("*.json"))
    damaged = {runs[0].stem: runs[0].read_bytes()[:100], runs[1].stem: b"{}",
               runs[2].stem: bytes(range(256))}  # fmt: skip
    for rid, content in damaged.items():
        (tmp_path / "runs" / f"{rid}.json").write_bytes(content)
    capsys.readouterr()
    count = Counter(monkeypatch)
    summary = _run(configs, tmp_path, stack=6)
    assert summary.skipped == 9 and summary.done == 3 and not summary.failed
    assert count.later == 3 and count.d1 == [] and count.importance == []  # caches reused
    err = capsys.readouterr().err
    for rid, content in damaged.items():
        line = f"masq: warning: {tmp_path / 'runs' / rid}.json is not a valid run record ("
        assert line in err
        assert (tmp_path / "invalid" / f"{rid}.json").read_bytes() == content
    redone = _records(tmp_path)
    assert {k: _comparable(v) for k, v in redone.items()} == {
        k: _comparable(v) for k, v in original.items()
    }  # the same numbers as the first time


@pytest.mark.parametrize("cache", ["d1", "importance"])
def test_a_damaged_cache_file_is_named_and_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cache: str
) -> None:
    configs = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,)))  # one group: λ 0, 10, 1000
    _run(configs, tmp_path)
    original = _records(tmp_path)
    (path,) = (tmp_path / cache).glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    for p in (tmp_path / "runs").glob("*.json"):
        p.unlink()
    capsys.readouterr()
    count = Counter(monkeypatch)
    summary = _run(configs, tmp_path)
    assert summary.done == 3 and not summary.failed
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"masq: warning: cached tensors {path} are invalid (")
    assert "truncated or changed" in err and err.endswith("recomputing")
    # only the damaged file is recomputed (task 1 is deterministic: its importance stays valid)
    assert (len(count.d1), len(count.importance)) == ((1, 0) if cache == "d1" else (0, 1))
    again = _records(tmp_path)
    assert {k: _comparable(v) for k, v in again.items()} == {
        k: _comparable(v) for k, v in original.items()
    }
    capsys.readouterr()
    for p in (tmp_path / "runs").glob("*.json"):
        p.unlink()
    _run(configs, tmp_path)  # repaired: used without a word
    assert capsys.readouterr().err == ""
    assert (len(count.d1), len(count.importance)) == ((1, 0) if cache == "d1" else (0, 1))


def test_old_pickled_caches_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,), lam=(10.0,)))[0]
    for folder, key in (("d1", grid.d1_key(config)), ("importance", grid.importance_key(config))):
        (tmp_path / folder).mkdir(parents=True)
        torch.save({"junk": torch.zeros(1)}, tmp_path / folder / f"{key}.pt")
    count = Counter(monkeypatch)
    assert _run([config], tmp_path).done == 1
    assert len(count.d1) == 1 and len(count.importance) == 1


def test_a_cache_that_cannot_be_written_costs_only_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(self: Store, path: Path, payload: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "save_tensors", full)
    configs = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,)))
    summary = _run(configs, tmp_path)
    assert summary.done == 3 and not summary.failed
    err = capsys.readouterr().err
    assert err.count("masq: warning: could not cache ") == 2  # task 1 and its importance
    assert "(No space left on device); it will be recomputed next time" in err


def test_a_finished_run_that_cannot_be_stored_is_rescued_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tempfile

    import masq.store

    configs = expand(tiny_grid(hidden=((8,),)))
    _run(configs, tmp_path / "reference")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    res = tmp_path / "res"
    real = masq.store.atomic_write
    lost = {run_id(c) for c in configs if c.lam == 10.0}

    def failing(path: Any, data: Any) -> Path:
        if Path(path).stem in lost and Path(path).parent.name == "runs":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(masq.store, "atomic_write", failing)
    summary = _run(configs, res)
    assert set(summary.failed) == lost and summary.done == len(configs) - len(lost) == 4
    rescued = masq.fileio.rescue_dir(res) / "runs"
    assert rescued.is_relative_to(tmp_path / "tmp")
    reference = _records(tmp_path / "reference")
    for rid in lost:
        assert summary.failed[rid].startswith(f"NotStored: could not write {res / 'runs' / rid}")
        record = json.loads((rescued / f"{rid}.json").read_text(encoding="utf-8"))
        assert _comparable(record["result"]) == _comparable(reference[rid])  # nothing lost
        assert (res / "errors" / f"{rid}.json").exists()
    assert capsys.readouterr().err.count("the finished run was saved to") == len(lost)


def test_a_grid_refuses_a_results_dir_another_grid_holds(tmp_path: Path) -> None:
    from masq.fileio import exclusive_lock

    configs = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,)))
    Store(tmp_path)
    with exclusive_lock(tmp_path / ".lock"), pytest.raises(ConfigError) as info:
        _run(configs, tmp_path)
    assert f"is in use by another masq process (pid {os.getpid()})" in str(info.value)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    (tmp_path / "runs" / ".x.json.123.tmp").write_text("half")  # a killed writer's leftover
    assert _run(configs, tmp_path).done == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_missing_device_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    configs = expand(tiny_grid(device="cuda:1"))
    with pytest.raises(ConfigError, match=r"device 'cuda:1': no CUDA GPU is visible here"):
        _run(configs, tmp_path / "res")
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_kill_9_loses_at_most_the_runs_in_flight(tmp_path: Path) -> None:
    results = tmp_path / "res"
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from masq import grid
from tests.test_grid import synthetic_tasks, tiny_grid
configs = grid.expand(tiny_grid(iters2=(400,), lr2=(1e-2, 1e-3, 1e-4)))
grid.execute(configs, {str(results)!r}, stack=1, progress=False, tasks_fn=synthetic_tasks,
             threads=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list((results / "runs").glob("*.json"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    configs = expand(tiny_grid(iters2=(400,), lr2=(1e-2, 1e-3, 1e-4)))
    stored = _records(results)  # every file parses: no half-written record
    assert 2 <= len(stored) < len(configs)
    summary = _run(configs, results, stack=6)
    assert summary.skipped == len(stored)
    assert summary.done == len(configs) - len(stored) and not summary.failed


def test_errors_are_recorded_and_the_grid_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = expand(tiny_grid())
    real = protocol.compute_importance

    def fail_for_small(config: RunConfig, d1: Any, tasks: list) -> Any:
        if config.hidden == (8,):
            raise RuntimeError("importance exploded")
        return real(config, d1, tasks)

    monkeypatch.setattr(protocol, "compute_importance", fail_for_small)
    summary = _run(configs, tmp_path)
    failed = {c for c in configs if c.hidden == (8,) and c.lam > 0}
    assert set(summary.failed) == {run_id(c) for c in failed}
    assert summary.done == len(configs) - len(failed)
    errors = Store(tmp_path).error_records()
    assert len(errors) == 4 and "importance exploded" in errors[0]["error"]
    monkeypatch.setattr(protocol, "compute_importance", real)
    retry = _run(configs, tmp_path)
    assert retry.done == 4 and not retry.failed and not Store(tmp_path).error_records()


def test_a_failure_of_some_runs_is_recorded_and_the_grid_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = expand(tiny_grid())
    real = protocol.continue_stacked

    def diverge_at_small_rate(stack: list[RunConfig], *a: Any, **kw: Any) -> list:
        if stack[0].lr2 == 1e-3:  # stacks of 3 are one lr2 each (λ is the innermost axis)
            raise FloatingPointError("lr2 1e-3 diverged")
        return real(stack, *a, **kw)

    monkeypatch.setattr(protocol, "continue_stacked", diverge_at_small_rate)
    summary = _run(configs, tmp_path, stack=3)
    bad = {run_id(c) for c in configs if c.lr2 == 1e-3}
    assert len(bad) == 6 and set(summary.failed) == bad
    assert set(summary.failed.values()) == {"FloatingPointError: lr2 1e-3 diverged"}
    assert summary.done == 6 and set(_records(tmp_path)) == {run_id(c) for c in configs} - bad
    errors = {e["run_id"]: e for e in Store(tmp_path).error_records()}
    assert set(errors) == bad == {p.stem for p in (tmp_path / "errors").glob("*.json")}
    for e in errors.values():
        assert e["error"] == "FloatingPointError: lr2 1e-3 diverged"
        assert "Traceback (most recent call last)" in e["traceback"]
        assert "diverge_at_small_rate" in e["traceback"]


def test_a_systematic_failure_stops_the_grid_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = expand(tiny_grid())
    calls: list[int] = []

    def broken(stack: list[RunConfig], *a: Any, **kw: Any) -> list:
        calls.append(len(stack))
        raise RuntimeError("stacked kernel broke")

    monkeypatch.setattr(protocol, "continue_stacked", broken)
    with pytest.raises(GridAborted) as info:
        _run(configs, tmp_path)
    err = info.value
    assert "every run of the first group failed" in str(err)
    assert "RuntimeError: stacked kernel broke" in str(err)
    assert "Traceback (most recent call last)" in err.traceback
    assert "in broken" in err.traceback and "stacked kernel broke" in err.traceback
    assert calls == [4, 2]  # the first group's two stacks, nothing of the second group
    first = {run_id(c) for c in configs if c.hidden == (8,)}
    assert {p.stem for p in (tmp_path / "errors").glob("*.json")} == first
    assert len(list((tmp_path / "d1").glob("*.safetensors"))) == 1  # the second group never started
    assert not list((tmp_path / "runs").glob("*.json"))


def test_only_the_first_group_decides_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first group failing with different errors, or a later group failing throughout with
    one error, does not stop the grid: each failure is recorded."""
    configs = expand(tiny_grid())

    def broken(stack: list[RunConfig], *a: Any, **kw: Any) -> list:
        if stack[0].hidden == (6, 4):
            raise RuntimeError("no kernel for two layers")
        raise RuntimeError(f"diverged at lr2 = {stack[0].lr2}")

    monkeypatch.setattr(protocol, "continue_stacked", broken)
    summary = _run(configs, tmp_path, stack=3)
    assert summary.done == 0 and set(summary.failed) == {run_id(c) for c in configs}
    assert summary.d1_trained == 2
    assert set(summary.failed.values()) == {
        "RuntimeError: diverged at lr2 = 0.01",
        "RuntimeError: diverged at lr2 = 0.001",
        "RuntimeError: no kernel for two layers",
    }


@pytest.mark.parametrize(
    "oom",
    [
        lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)"),
    ],
    ids=["OutOfMemoryError", "message"],
)
def test_a_stack_out_of_cuda_memory_is_retried_in_halves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, oom: Any
) -> None:
    configs = expand(tiny_grid(hidden=((8,),), lam=(10.0, 100.0, 1000.0, 1e4)))
    assert len(configs) == 8 and len(grid.plan(configs)) == 1
    real = protocol.continue_stacked
    sizes: list[int] = []

    def small_gpu(stack: list[RunConfig], *a: Any, **kw: Any) -> list:
        sizes.append(len(stack))
        if len(stack) > 2:
            raise oom()
        return real(stack, *a, **kw)

    monkeypatch.setattr(protocol, "continue_stacked", small_gpu)
    job = GroupJob(str(tmp_path / "oom"), tuple(configs), stack=8, threads=1,
                   tasks_fn=synthetic_tasks)  # fmt: skip
    stored: list[int] = []
    outcome = grid.run_group(job, stored.append)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    assert outcome.retried_stacks == 3 and stored == [2, 2, 2, 2]
    assert sorted(outcome.done) == sorted(run_id(c) for c in configs) and not outcome.failed
    halves = _records(tmp_path / "oom")
    assert {r["meta"]["stack"] for r in halves.values()} == {2}
    # the same records as stacks of 2 from the start
    monkeypatch.setattr(protocol, "continue_stacked", real)
    _run(configs, tmp_path / "two", stack=2)
    twos = _records(tmp_path / "two")
    assert set(halves) == set(twos)
    for rid, rec in halves.items():
        assert rec["curves"] == twos[rid]["curves"] and rec["best"] == twos[rid]["best"]


def test_a_single_run_out_of_memory_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,), lam=(10.0, 100.0)))
    sizes: list[int] = []

    def no_gpu(stack: list[RunConfig], *a: Any, **kw: Any) -> list:
        sizes.append(len(stack))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(protocol, "continue_stacked", no_gpu)
    job = GroupJob(str(tmp_path), tuple(configs), stack=2, threads=1, tasks_fn=synthetic_tasks)
    outcome = grid.run_group(job)
    assert sizes == [2, 1, 1] and outcome.retried_stacks == 1
    assert set(outcome.failed) == {run_id(c) for c in configs} and not outcome.done
    assert all("CUDA out of memory" in m for m in outcome.failed.values())


def _comparable(rec: dict) -> tuple:
    return (rec["config"], rec["curves"], rec["best"], rec["last"], rec["accuracy"],
            rec["metrics"], rec["importance_summary"])  # fmt: skip


def test_stack_sizes_and_one_by_one_agree(tmp_path: Path) -> None:
    configs = expand(tiny_grid(hidden=((8,),)))
    _run(configs, tmp_path / "k1", stack=1)
    _run(configs, tmp_path / "k4", stack=4)
    one, four = _records(tmp_path / "k1"), _records(tmp_path / "k4")
    assert set(one) == set(four) == {run_id(c) for c in configs}
    for rid in one:
        a, b = one[rid], four[rid]
        assert a["curves"][0] == b["curves"][0]
        for key, values in a["curves"][1].items():
            assert values == pytest.approx(b["curves"][1][key], abs=0.011)  # <= 1 of 100 samples
        assert b["meta"]["stack"] in (2, 4) and "stack" not in a["meta"]


@pytest.fixture
def learnable_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """``masq.data.load`` returns a tiny learnable MNIST-shaped dataset."""
    data = learnable_dataset(300, 60, 120)

    def load(name: str = "mnist", **kw: Any) -> masq.data.Dataset:
        assert name == "mnist"
        return data

    monkeypatch.setattr(masq.data, "load", load)


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("timings", "meta")}


def _assert_close(a: Any, b: Any, where: str = "record") -> None:
    """``a`` == ``b`` in structure and every string, every number within 0.011 (an accuracy
    within about one test sample of the tiny sets; a stack rounds differently)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, str):
        assert a == pytest.approx(b, abs=0.011, rel=1e-3), where
    else:
        assert a == b, where


def test_a_three_task_grid_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, learnable_mnist: None
) -> None:
    torch.set_num_threads(1)
    g = tiny_grid(
        slt=("D3-3-4",),
        hidden=((16,),),
        lr1=(1e-2,),
        iters1=(30,),
        iters2=(20,),
        lr2=(1e-2,),
        lam=(0.0, 1e4),
        importance=("masq", "fisher"),
        consolidation=("ewc", "online-ewc"),
        gamma=(1.0, 0.5),
    )
    configs = expand(g)
    # λ = 0 once; λ = 10^4: EWC, online EWC with γ = 1 and γ = 0.5, for both importances
    assert len(configs) == 7
    count = Counter(monkeypatch)
    summary = execute(configs, tmp_path, stack=16, progress=False, threads=1)
    assert summary.done == 7 and not summary.failed
    assert summary.d1_trained == 1 and summary.importance_computed == 2
    assert len(count.d1) == 1 and len(count.importance) == 2
    assert count.stacks == [7] and count.singles == 0  # three tasks: stacked as two
    records = _records(tmp_path)
    assert set(records) == {run_id(c) for c in configs}
    first = next(iter(records.values()))["curves"][0]
    for config in configs:
        rec = records[run_id(config)]
        curves = rec["curves"]
        assert len(curves) == 3 and curves[0] == first  # one shared task-1 state
        assert U2 in curves[1] and U3 in curves[1] and U2 not in curves[2]
        assert rec["accuracy"] == [[c[f"D{j}"][-1] for j in (1, 2, 3)] for c in curves]
        assert rec["best"][U3] == max(curves[2][U3][1:])
        assert len(rec["timings"]["train"]) == 3
        assert len(rec["timings"]["importance"]) == (2 if config.lam > 0 else 1)
        # the grid's record is the record of the whole protocol run on its own (to rounding)
        alone = protocol.run(config, keep_weights=False).to_dict()
        _assert_close(_without_timings(rec), json.loads(json.dumps(_without_timings(alone))))
    # the curves move and the methods differ (not a comparison of constants)
    assert len({json.dumps(r["curves"][2]) for r in records.values()}) > 1
    # more λ later: task 1 and its importances come from the store, the records stay exact
    more = expand(dataclasses.replace(g, lam=(0.0, 1e4, 100.0)))
    summary = execute(more, tmp_path, stack=16, progress=False, threads=1)
    assert summary.skipped == 7 and summary.done == 6
    assert summary.d1_trained == 0 and summary.importance_computed == 0
    records = _records(tmp_path)
    new = [c for c in more if c not in configs]
    assert len(new) == 6 and {c.lam for c in new} == {100.0}
    for config in new:
        alone = protocol.run(config, keep_weights=False).to_dict()
        rec = records[run_id(config)]
        _assert_close(_without_timings(rec), json.loads(json.dumps(_without_timings(alone))))


@pytest.mark.slow
def test_process_pool_equals_inline(tmp_path: Path) -> None:
    configs = expand(tiny_grid())
    _run(configs, tmp_path / "inline", stack=3)
    summary = _run(configs, tmp_path / "pool", stack=3, workers=2)
    assert summary.done == 12 and not summary.failed
    a, b = _records(tmp_path / "inline"), _records(tmp_path / "pool")
    assert {k: _comparable(v) for k, v in a.items()} == {k: _comparable(v) for k, v in b.items()}


def test_spread_cuts_groups_by_chunks_until_every_worker_has_a_job() -> None:
    three = expand(tiny_grid(slt=("D3-3-4",), hidden=((8,),), lam=(0.0, 1.0, 10.0, 100.0)))
    groups = grid.plan(three)
    assert len(groups) == 1 and len(three) == 8  # one task-1 state; --stack 1: one by one
    assert grid.plan_spread(groups, 1, 1) == [tuple(three)]
    assert [len(p) for p in grid.plan_spread(groups, 3, 4)] == [4, 4]  # two stacks, never cut
    parts = grid.plan_spread(groups, 3, 1)  # cut until no part holds more than 8 / (2·3)
    assert len(parts) == 8 and sorted(run_id(c) for p in parts for c in p) == sorted(
        run_id(c) for c in three
    )  # every run once
    two = expand(tiny_grid())  # 2 groups of 6 two-task runs: stacks of 4 and 2 each
    parts = grid.plan_spread(grid.plan(two), 8, 4)
    assert len(parts) == 4 and sorted(len(p) for p in parts) == [2, 2, 4, 4]  # stacks whole


def _three_groups_of_16() -> list[Any]:
    """Three task-1 states (seeds 0-2), each with 16 runs that go one by one (--stack 1)."""
    lams = tuple(float(10**k) for k in range(16))
    configs = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,), lam=lams, seed=(0, 1, 2)))
    groups = grid.plan(configs)
    assert [len(g.configs) for g in groups] == [16, 16, 16]
    return groups


def test_spread_cuts_few_large_groups_so_that_none_runs_alone_at_the_end() -> None:
    """Three groups of 16 one-by-one runs on two workers: each is cut in two (no part above
    48 / (2·2) runs), and every group's first half comes before any second half, so a second
    half starts once its group's task-1 state is cached. On one worker nothing is cut."""
    groups = _three_groups_of_16()
    parts = grid.plan_spread(groups, 2, 1, order=True)
    assert [len(p) for p in parts] == [8] * 6
    seeds = [p[0].seed for p in parts]
    assert seeds == [0, 1, 2, 0, 1, 2]
    assert [c.lam for c in parts[0]] == [float(10**k) for k in range(0, 16, 2)]  # dealt alternately
    assert len(grid.plan_spread(groups, 1, 1)) == 3


def test_estimate_charges_a_groups_task_1_to_the_part_that_computes_it() -> None:
    """The wall time of the six parts above (10 s per run, a task-1 state of 5 s per group)
    on two workers: the parts that start after their group's first part has cached its task-1
    state pay nothing for it; 250 s, where the three uncut groups take 330 s."""
    from masq.grid.plan import makespan

    groups = _three_groups_of_16()
    parts = [[((c,), 10.0) for c in g.configs] for g in groups]
    shared = [(5.0, 0.0)] * 3
    assert makespan(parts, shared, 2) == pytest.approx(250.0)
    assert makespan(parts, shared, 1) == pytest.approx(3 * (5 + 160))


def test_spread_gives_each_run_that_trains_its_own_task_1_a_job_of_its_own() -> None:
    """A group's SI runs share neither its task-1 state nor its importance: each is a job, so
    a free worker takes it while another trains the group's stack (the group is one job)."""
    stacked = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,)))  # one group, λ 0, 10, 1000
    si = [stacked[1].with_(importance="si", lam=lam) for lam in (1.0, 2.0)]
    groups = grid.plan([*stacked, *si])
    assert len(groups) == 1  # one task-1 state: SI's own phase 1 trains alike
    parts = grid.plan_spread(groups, 1, 4)
    assert parts == [tuple(stacked), (si[0],), (si[1],)]  # even on one worker: jobs, same runs
    parts = grid.plan_spread(groups, 2, 4, order=True)
    assert parts[0] == tuple(stacked)  # the largest job first
    assert sorted(parts[1:], key=lambda p: p[0].lam) == [(si[0],), (si[1],)]
    just_si = grid.plan_spread(grid.plan(si), 4, 4)
    assert just_si == [(si[0],), (si[1],)]  # nothing to cut further: a part of one run


def test_job_weight_is_the_arithmetic_of_the_job() -> None:
    from masq.config import n_params
    from masq.grid.plan import job_weight

    two = expand(tiny_grid(hidden=((8,),)))  # one task-1 state, 6 two-task runs
    p = n_params((8,))
    assert p == 784 * 8 + 8 + 8 * 10 + 10
    assert job_weight(two) == 12 * 20 * p + 6 * 1 * 10 * 20 * p  # iters1·B·P + Σ (T−1)·iters2·B·P
    three = expand(tiny_grid(slt=("D3-3-4",), hidden=((8,),), lam=(1.0,)))  # 2 runs, T = 3
    assert job_weight(three) == 12 * 20 * p + 2 * 2 * 10 * 20 * p


def test_spread_orders_jobs_largest_first_only_when_asked() -> None:
    small = expand(tiny_grid(hidden=((4,),), lr2=(1e-2,), lam=(1.0,)))
    large = expand(tiny_grid(hidden=((32, 32),), lr2=(1e-2,), lam=(1.0,)))
    groups = grid.plan(small + large)
    assert grid.plan_spread(groups, 2, 4) == [tuple(small), tuple(large)]  # as they appear
    assert grid.plan_spread(groups, 2, 4, order=True) == [tuple(large), tuple(small)]


def test_estimate_is_the_wall_time_of_the_largest_job_when_it_dominates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two groups on two workers, one 100 times the other's cost: the grid ends when the large
    one does, not after half the work (the old estimate, (a + b) / 2)."""
    monkeypatch.setattr(estimate_module, "measure", _fake_measure([]))
    small = expand(tiny_grid(hidden=((1,),), lr2=(1e-2,), lam=(1.0,)))
    large = expand(tiny_grid(hidden=((100,),), lr2=(1e-2,), lam=(1.0,)))
    groups = grid.plan(small + large)
    a = grid.estimate(grid.plan(small), 4, workers=1, threads=1).total
    b = grid.estimate(grid.plan(large), 4, workers=1, threads=1).total
    assert b == pytest.approx(100 * a)
    assert grid.estimate(groups, 4, workers=2, threads=1).total == pytest.approx(b)
    assert grid.estimate(groups, 4, workers=1, threads=1).total == pytest.approx(a + b)


def test_estimate_runs_a_groups_si_run_beside_its_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """One group: a stack and an SI run (its own task 1). On two workers they run side by
    side, so the wall time is the longer of the two jobs, each paying a task-1 training."""
    monkeypatch.setattr(estimate_module, "measure", _fake_measure([]))
    stacked = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,)))
    si = [stacked[1].with_(importance="si")]
    both = grid.plan([*stacked, *si])
    a = grid.estimate(grid.plan(stacked), 4, workers=1, threads=1).total
    b = grid.estimate(grid.plan(si), 4, workers=1, threads=1).total
    assert grid.estimate(both, 4, workers=2, threads=1).total == pytest.approx(max(a, b))
    assert grid.estimate(both, 4, workers=1, threads=1).total == pytest.approx(a + b)


@pytest.mark.slow
def test_one_group_of_single_runs_runs_on_every_worker(tmp_path: Path) -> None:
    configs = expand(tiny_grid(slt=("D3-3-4",), hidden=((8,),), lr2=(1e-2,),
                               lam=(0.0, 1.0, 10.0)))  # fmt: skip
    _run(configs, tmp_path / "inline", stack=1)
    summary = _run(configs, tmp_path / "pool", workers=2, stack=1)
    assert summary.done == len(configs) == 3 and not summary.failed
    assert summary.d1_trained == 2  # each of the two parts trained (or loaded) task 1
    a, b = _records(tmp_path / "inline"), _records(tmp_path / "pool")
    assert {k: _comparable(v) for k, v in a.items()} == {k: _comparable(v) for k, v in b.items()}


@pytest.mark.slow
def test_a_groups_si_run_is_a_job_beside_its_stack(tmp_path: Path) -> None:
    stacked = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,), lam=(0.0, 10.0)))
    configs = [*stacked, stacked[1].with_(importance="si", consolidation="online-ewc")]
    _run(configs, tmp_path / "inline")
    summary = _run(configs, tmp_path / "pool", workers=2)
    assert summary.done == len(configs) == 3 and not summary.failed
    assert summary.d1_trained == 1  # the SI job trains its own phase 1, not the group's
    a, b = _records(tmp_path / "inline"), _records(tmp_path / "pool")
    assert {k: _comparable(v) for k, v in a.items()} == {k: _comparable(v) for k, v in b.items()}


@pytest.mark.slow
def test_ray_executor_equals_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    configs = expand(tiny_grid(lam=(0.0, 10.0)))
    _run(configs, tmp_path / "local")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = _run(configs, tmp_path / "ray", executor="ray")
    finally:
        ray.shutdown()
    assert summary.done == len(configs) == 8 and not summary.failed
    a, b = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert {k: _comparable(v) for k, v in a.items()} == {k: _comparable(v) for k, v in b.items()}


def test_bad_execution_arguments(tmp_path: Path) -> None:
    configs = expand(tiny_grid())
    with pytest.raises(ConfigError, match="--workers"):
        execute(configs, tmp_path, workers=0, threads=1)
    with pytest.raises(ConfigError, match="--stack"):
        execute(configs, tmp_path, stack=0, threads=1)
    with pytest.raises(ConfigError, match="executor"):
        execute(configs, tmp_path, executor="slurm", threads=1)


# ----------------------------------------------------------------------------- estimate

UNIT = {  # seconds per unit for an architecture of weight f (see _fake_measure)
    "d1_iter": 1e-3,
    "d2_iter": 2e-3,
    "d2_iter_one": 5e-4,
    "eval_sample_one": 1e-6,
    "eval_sample_stack": 3e-6,
    "importance_sample": 4e-7,
}


def _weight(hidden: tuple[int, ...]) -> int:
    return sum(hidden)


def _fake_measure(calls: list[tuple[tuple[int, ...], int]]) -> Any:
    def measure(hidden: tuple[int, ...], stack: int, *a: Any, **kw: Any) -> dict[str, float]:
        calls.append((hidden, stack))
        return {k: v * _weight(hidden) for k, v in UNIT.items()}

    return measure


def test_estimate_is_the_arithmetic_of_the_measured_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []
    monkeypatch.setattr(estimate_module, "measure", _fake_measure(calls))
    two = expand(tiny_grid())  # groups (8,) and (6, 4): 6 runs each, λ > 0 in 4
    three = expand(tiny_grid(slt=("D3-3-4",), hidden=((8,),), consolidation=("ewc", "online-ewc")))
    assert len(three) == 10 and sum(c.lam > 0 for c in three) == 8
    groups = grid.plan(two + three)
    assert len(groups) == 3
    est = grid.estimate(groups, 4, workers=2, threads=1)
    assert sorted(calls) == [((6, 4), 4), ((8,), 4)]  # each architecture measured once

    def cost(hidden: tuple[int, ...], key: str) -> float:
        return UNIT[key] * _weight(hidden)

    # per group: [task-1 training, importance, re-training, evaluation]
    parts = {name: [0.0, 0.0, 0.0, 0.0] for name in ("two (8,)", "two (6, 4)", "three")}
    # task 1 of every group: 12 iterations, evaluated at 0, 5, 10, 12 on 10,000 test images
    for name, hidden in (("two (8,)", (8,)), ("two (6, 4)", (6, 4)), ("three", (8,))):
        e1 = 4 * 10_000 * cost(hidden, "eval_sample_one")
        parts[name][0] += 12 * cost(hidden, "d1_iter") + e1
        parts[name][3] += e1
    # D5-5: one importance pass over 27,500 training images per group; 6 runs in stacks of
    # 4 and 2 (a short stack costs its share, 2/4), 10 iterations, evaluated at 0, 5, 10
    for name, hidden in (("two (8,)", (8,)), ("two (6, 4)", (6, 4))):
        parts[name][1] += 27_500 * cost(hidden, "importance_sample")
        eval_stack = 3 * 10_000 * cost(hidden, "eval_sample_stack")
        parts[name][2] += (10 * cost(hidden, "d2_iter") + eval_stack) * (4 / 4 + 2 / 4)
        parts[name][3] += eval_stack * (4 / 4 + 2 / 4)
    # D3-3-4 (task 1: 3 of 10 classes, 16,500 images): one pass for task 1, then the 10 runs
    # in stacks of 4, 4 and 2 over T - 1 = 2 phases each, and T - 2 = 1 more pass (run by run)
    # for each of the 8 λ > 0
    h = (8,)
    parts["three"][1] += 9 * 16_500 * cost(h, "importance_sample")
    eval_stack = 3 * 10_000 * cost(h, "eval_sample_stack")
    parts["three"][2] += 2 * (10 * cost(h, "d2_iter") + eval_stack) * (4 / 4 + 4 / 4 + 2 / 4)
    parts["three"][3] += 2 * eval_stack * (4 / 4 + 4 / 4 + 2 / 4)
    d1, imp, d2, ev = (sum(p[i] for p in parts.values()) for i in range(4))
    # on 2 workers, the groups uncut: the largest job first (the 10 three-task runs), then
    # the (8,) group (more parameters than (6, 4)) on the other worker, then (6, 4) on
    # whichever worker is free first; cut into their 7 chunks (none may hold more than 7/4),
    # the parts after a group's first load its task-1 state: never longer, never below half
    seconds = {name: p[0] + p[1] + p[2] for name, p in parts.items()}
    free = [seconds["three"], seconds["two (8,)"]]
    free[free.index(min(free))] += seconds["two (6, 4)"]
    assert (d1 + imp + d2) / 2 < est.total < max(free)
    wall = est.total
    share = wall / (d1 + imp + d2)  # the parts: the work's shares of the wall time
    assert est.d1 == pytest.approx(d1 * share)
    assert est.importance == pytest.approx(imp * share)
    assert est.d2 == pytest.approx(d2 * share)
    assert est.evaluation == pytest.approx(ev * share)
    assert est.total == pytest.approx(est.d1 + est.importance + est.d2)
    one = grid.estimate(groups, 4, workers=1, threads=1)  # one worker: the work itself
    assert one.total == pytest.approx(d1 + imp + d2)
    assert (est.workers, est.threads, est.architectures) == (2, 1, 2)
    assert est.measured == ((784, 6, 4, 10), (784, 8, 10))  # by parameter count: 4,788 < 6,370
    assert grid.estimate([], 4, workers=1, threads=1).total == 0.0
    # no importance, no pass (a config as given, not canonicalized: λ > 0 with "none")
    plain = RunConfig(slt="D3-3-4", hidden=(8,), iters1=12, iters2=10, eval_every=5, lam=10.0,
                      importance="none")  # fmt: skip
    assert grid.estimate(grid.plan([plain]), 4, workers=1, threads=1).importance == 0.0


def test_estimate_of_imm_runs_counts_one_training_passes_and_merges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []
    monkeypatch.setattr(estimate_module, "measure", _fake_measure(calls))
    configs = expand(tiny_grid(hidden=((8,),), lr2=(1e-2,), lam=(0.0,), eval_val=(True,),
                               consolidation=("mean-imm", "mode-imm"), importance=("fisher",
                               "masq"), alpha_step=(0.25,)))  # fmt: skip
    # mean-IMM once, mode-IMM with FIM and with MaSQ: one chunk, trained alike
    assert sorted(str(c.consolidation) for c in configs) == ["mean-imm", "mode-imm", "mode-imm"]
    groups = grid.plan(configs)
    est = grid.estimate(groups, 4, workers=1, threads=1)

    def cost(key: str) -> float:
        return UNIT[key] * 8

    # task 1: 12 iterations, evaluated at 0, 5, 10, 12 on 15,000 test + validation images
    d1 = 12 * cost("d1_iter") + 4 * 15_000 * cost("eval_sample_one")
    # task 1's importance: one pass per importance setting (FIM, MaSQ) over 27,500 images
    imp = sum(len(g.importance_keys) for g in groups) * 27_500 * cost("importance_sample")
    assert sum(len(g.importance_keys) for g in groups) == 2
    # the later phase once (10 iterations one by one, evaluated at 0, 5, 10), a pass on task 2
    # for each of the 2 mode-IMM runs, 5 merges (α_2 = 0, .25, ..., 1) per run evaluated on
    # the 15,000 test and validation images
    e_train = 3 * 15_000 * cost("eval_sample_one")
    merges = 3 * 5 * 15_000 * cost("eval_sample_one")
    imp += 2 * 27_500 * cost("importance_sample")
    d2 = 10 * cost("d2_iter_one") + e_train + merges
    assert est.d1 == pytest.approx(d1)
    assert est.importance == pytest.approx(imp)
    assert est.d2 == pytest.approx(d2)
    assert est.evaluation == pytest.approx(e_train + merges + 4 * 15_000 * cost("eval_sample_one"))


def test_estimate_takes_each_measures_own_pass_step_and_anchors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A structured measure's runs go one by one at its own step cost plus what each anchor
    beyond the first adds (EWC holds one per earlier task), its pass over its subset."""
    seen: list[dict[str, Any]] = []
    own = {"importance_sample:kfac": 1e-5, "d2_iter_one:kfac": 7e-3, "d2_anchor:kfac": 2e-3,
           "d2_anchor": 1e-4}  # fmt: skip

    def measure(hidden: tuple[int, ...], stack: int, *a: Any, **kw: Any) -> dict[str, float]:
        seen.append(dict(kw.get("measures") or {}))
        return {**UNIT, **own}

    monkeypatch.setattr(estimate_module, "measure", measure)
    kfac = RunConfig(slt="D4-2-2-2", hidden=(8,), iters1=12, iters2=10, eval_every=5,
                     importance="kfac", fisher_labels="exact", fisher_samples=100,
                     lam=10.0)  # fmt: skip
    est = grid.estimate(grid.plan([kfac]), 4, workers=1, threads=1)
    assert seen == [{"kfac": {"fisher_labels": kfac.fisher_labels, "fisher_samples": 100}}]
    # 3 later phases of 10 iterations: 1, 2, 3 anchors, on average 1 beyond the first
    evals = 3 * 3 * 10_000 * UNIT["eval_sample_one"]
    assert est.d2 == pytest.approx(3 * 10 * (7e-3 + 1 * 2e-3) + evals)
    # the passes over the 100-sample subset: after task 1, then after tasks 2 and 3 (not 4)
    assert est.importance == pytest.approx(3 * 100 * 1e-5)
    diagonal = kfac.with_(importance="fisher", consolidation="online-ewc")  # one anchor
    est = grid.estimate(grid.plan([diagonal]), 1, workers=1, threads=1)  # --stack 1
    assert est.d2 == pytest.approx(3 * 10 * UNIT["d2_iter_one"] + evals)
    # stacked (a stack of 1 of 4 costs its share): 3 phases of the stack's step and evaluation
    est = grid.estimate(grid.plan([diagonal]), 4, workers=1, threads=1)
    stack_evals = 3 * 10_000 * UNIT["eval_sample_stack"]
    assert est.d2 == pytest.approx(3 * (10 * UNIT["d2_iter"] + stack_evals) / 4)


def test_calibrate_measures_three_and_interpolates_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from masq.config import n_params

    calls: list[tuple[int, ...]] = []

    def linear(hidden: tuple[int, ...], stack: int, *a: Any, **kw: Any) -> dict[str, float]:
        calls.append(hidden)
        return {"d1_iter": 1e-9 * n_params(hidden) + 1e-4}

    monkeypatch.setattr(estimate_module, "measure", linear)
    archs = [(100,), (10,), (50, 50), (20,)]  # by parameter count: 10, 20, 50-50, 100
    costs, picked = grid.calibrate(archs, 4, threads=1)
    assert picked == ((10,), (50, 50), (100,)) and sorted(calls) == sorted(picked)
    assert costs[(20,)]["d1_iter"] == pytest.approx(1e-9 * n_params((20,)) + 1e-4)
    assert set(costs) == set(archs)


def test_estimate_calibrates_at_each_batch_size_of_the_grid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grid's costs are measured at its own mini-batch size (a step of B = 128 costs more
    than one of 100); groups of two batch sizes are calibrated, and priced, separately."""
    seen: list[tuple[tuple[int, ...], int]] = []

    def by_batch(hidden: tuple[int, ...], stack: int, *a: Any, **kw: Any) -> dict[str, float]:
        seen.append((hidden, kw["batch_size"]))
        return {k: v * kw["batch_size"] for k, v in UNIT.items()}

    monkeypatch.setattr(estimate_module, "measure", by_batch)
    small, large = (
        expand(tiny_grid(hidden=((8,),))),
        expand(tiny_grid(hidden=((8,),), batch_size=(40,))),
    )
    est_small = grid.estimate(grid.plan(small), 4, workers=1, threads=1)
    est_large = grid.estimate(grid.plan(large), 4, workers=1, threads=1)
    assert seen == [((8,), 20), ((8,), 40)]
    assert est_large.total == pytest.approx(2 * est_small.total)
    seen.clear()
    both = grid.estimate(grid.plan(small + large), 4, workers=1, threads=1)
    assert sorted(seen) == [((8,), 20), ((8,), 40)]
    assert both.total == pytest.approx(est_small.total + est_large.total)


def test_estimate_calibrates_at_the_grids_input_and_head_sizes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A padded grid (--pad 2: 32×32 inputs) is timed on nets with 1,024 inputs; permuted
    tasks in the task scenario on a head of T·10 units (the head the runs build), in the
    domain scenario on 10."""
    seen: list[tuple[int, int]] = []

    def by_size(hidden: tuple[int, ...], stack: int, *a: Any, **kw: Any) -> dict[str, float]:
        seen.append((kw.get("in_features", 784), kw.get("classes", 10)))
        return dict(UNIT)

    monkeypatch.setattr(estimate_module, "measure", by_size)
    plain = expand(tiny_grid(hidden=((8,),)))
    padded = expand(tiny_grid(hidden=((8,),), pad=(2,)))
    est = grid.estimate(grid.plan(plain + padded), 4, workers=1, threads=1)
    assert sorted(seen) == [(784, 10), (1024, 10)]
    assert sorted(est.measured) == [(784, 8, 10), (1024, 8, 10)]  # what the dry run prints
    seen.clear()
    permuted = expand(tiny_grid(slt=("DP10-10-10",), hidden=((8,),), scenario=("task", "domain")))
    est = grid.estimate(grid.plan(permuted), 4, workers=1, threads=1)
    assert sorted(seen) == [(784, 10), (784, 30)]
    assert sorted(est.measured) == [(784, 8, 10), (784, 8, 30)]
    assert est.architectures == 2  # one hidden shape, two heads


@pytest.mark.parametrize(("pixels", "classes"), [(1024, 10), (784, 2), (784, 100)])
def test_measure_times_a_net_of_the_given_input_and_head_sizes(pixels: int, classes: int) -> None:
    """Its labels lie on the head (split MNIST's domain scenario: 2 units)."""
    costs = estimate_module.measure((8,), 2, short=1, long=2, in_features=pixels, classes=classes)
    assert costs and all(math.isfinite(v) and v >= 0 for v in costs.values())


def test_per_iteration_is_the_median_of_its_timed_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """(t(long) − t(short)) / (long − short) per pair, the median of three: one pair slowed by
    the machine does not move the estimate."""
    # three pairs of (start, after short, after long): per iteration 1.0, 5.0 and 2.0 s
    clock = iter([0.0, 1.0, 4.0, 10.0, 11.0, 22.0, 30.0, 31.0, 36.0])
    monkeypatch.setattr(estimate_module.time, "perf_counter", lambda: next(clock))
    runs: list[int] = []
    assert estimate_module._per_iteration(runs.append, 2, 4) == pytest.approx(2.0)
    assert runs == [2, 2, 4, 2, 4, 2, 4]  # a warm-up, then three pairs


def test_task_sizes() -> None:
    assert grid.task_sizes("DP10-10", False) == (55_000, 20_000)
    assert grid.task_sizes("D5-5", True) == (27_500, 15_000)
    assert grid.task_sizes("D3-3-4", False) == (16_500, 10_000)
    assert grid.task_sizes("DP10-10-10", True) == (55_000, 45_000)
    assert grid.task_sizes("D5-5", False, train_on_val=True) == (30_000, 10_000)


def test_a_results_dir_holds_one_device_kind(tmp_path: Path) -> None:
    from masq.grid.executors import check_device_kind, device_kind

    store = Store(tmp_path / "r")
    cpu = [RunConfig(device="cpu"), RunConfig(device="cpu", lam=0.0)]
    check_device_kind(store, cpu)
    assert json.loads((store.root / "devices.json").read_text()) == {"kind": "cpu"}
    check_device_kind(store, cpu)  # the same kind again: fine
    with pytest.raises(ConfigError, match="holds runs computed on cpu") as info:
        check_device_kind(store, [RunConfig(device="cuda:1")])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="one device kind"):
        check_device_kind(
            Store(tmp_path / "s"), [RunConfig(device="cpu"), RunConfig(device="cuda")]
        )
    assert device_kind("cuda:3") == "cuda" and device_kind("cpu") == "cpu"
    assert device_kind("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_grid_is_a_written_dataclass_with_one_axis_per_field() -> None:
    """Grid spells its axes out (editors and type checkers see them); they are the id fields
    of RunConfig, with RunConfig's defaults as one-value axes, in the same order."""
    from masq.grid.spec import AXIS_FIELDS

    fields = [f.name for f in dataclasses.fields(Grid)]
    assert fields == [*(f.name for f in AXIS_FIELDS), "lam_per_lr2", "device"]
    default = Grid()
    for spec in AXIS_FIELDS:
        assert getattr(default, spec.name) == (spec.default,), spec.name


def test_calibration_times_a_user_penalty_kind_through_add_grad_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A registered penalty kind needs only value and add_grad (the Penalty protocol): the
    calibration of its step calls add_grad, as the phase loop does, never the object itself."""
    from masq.config import Precision
    from masq.consolidation.penalty import PENALTY_KINDS
    from masq.consolidation.structured import KFACPenalty
    from masq.importance import MEASURES, Measure
    from masq.importance.kfac import KFAC

    calls: list[int] = []

    class Plain:  # value and add_grad, no __call__
        def __init__(self, model: Any, anchors: Any, lam: float) -> None:
            self.inner = KFACPenalty(model, anchors, lam)

        def value(self, params: Any) -> torch.Tensor:
            return self.inner.value(params)

        def add_grad(self, params: Any) -> None:
            calls.append(1)
            self.inner.add_grad(params)

    monkeypatch.setitem(PENALTY_KINDS, "plain-kfac", Plain)
    measure = Measure(
        "plain-kfac", label="plain K-FAC", compute=KFAC.compute, fields=KFAC.fields,
        kind="plain-kfac",
    )  # fmt: skip
    monkeypatch.setitem(MEASURES, "plain-kfac", measure)
    from masq.models import mlp

    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(300, 784, generator=gen), torch.randint(0, 10, (300,), generator=gen))
    settings = {"fisher_labels": "exact", "fisher_samples": 50}
    out = estimate_module._measure_costs(
        mlp((8,), seed=0), data, "plain-kfac", settings, 2, 4, Precision.FP32, torch.device("cpu")
    )
    assert set(out) == {
        "importance_sample:plain-kfac", "d2_iter_one:plain-kfac", "d2_anchor:plain-kfac"
    }  # fmt: skip
    assert len(calls) > 0


def test_adam_state_keep_through_the_grid_and_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, learnable_mnist: None
) -> None:
    """adam_state keep: its own task-1 state, cached with Adam's moments; its runs stacked,
    each starting from those moments; each record is the record of the run on its own, also
    when task 1 and its moments come back from the cache."""
    torch.set_num_threads(1)
    g = tiny_grid(slt=("D3-3-4",), hidden=((16,),), lr1=(1e-2,), iters1=(30,), iters2=(20,),
                  lr2=(1e-2,), lam=(0.0, 1e3), importance=("fisher",),
                  adam_state=("reset", "keep"))  # fmt: skip
    configs = expand(g)
    assert len(configs) == 4 and len(grid.plan(configs)) == 2  # keep trains its own task 1
    keep = [c for c in configs if c.adam_state == "keep"]
    assert one_by_one(keep, 16) == {}
    count = Counter(monkeypatch)
    summary = execute(configs, tmp_path, stack=16, progress=False, threads=1)
    assert summary.done == 4 and not summary.failed
    assert count.stacks == [2, 2] and count.singles == 0  # reset and keep: a stack each
    key = grid.d1_key(keep[0])
    cached = Store(tmp_path).load_tensors(tmp_path / "d1" / f"{key}.safetensors")
    assert cached is not None and cached["adam_step"] == 30
    assert set(cached["adam_exp_avg"]) == set(cached["state_dict"])
    records = _records(tmp_path)
    for config in configs:
        alone = protocol.run(config, keep_weights=False).to_dict()
        rec = records[run_id(config)]
        _assert_close(_without_timings(rec), json.loads(json.dumps(_without_timings(alone))))
    assert records[run_id(keep[1])]["curves"][2] != records[run_id(configs[1])]["curves"][2]
    # more λ later: task 1 and Adam's moments come from the cache
    more = expand(dataclasses.replace(g, lam=(1e2,), adam_state=("keep",)))
    summary = execute(more, tmp_path, stack=16, progress=False, threads=1)
    assert summary.done == 1 and summary.d1_trained == 0
    alone = protocol.run(more[0], keep_weights=False).to_dict()
    rec = _records(tmp_path)[run_id(more[0])]
    _assert_close(_without_timings(rec), json.loads(json.dumps(_without_timings(alone))))


@pytest.mark.parametrize(
    "change",
    [{"pad": 2}, {"permute_first": True}, {"train_on_val": True}, {"dataset": "fashion-mnist"}],
)
def test_the_tasks_cache_builds_anew_when_any_data_field_changes(change: dict[str, Any]) -> None:
    built: list[RunConfig] = []

    def tasks_fn(config: RunConfig) -> list[masq_tasks.Task]:
        built.append(config)
        return []

    cache = group_module.TasksCache()
    base = RunConfig(slt="DP10-10", hidden=(8,))
    cache.get(base, tasks_fn)
    cache.get(dataclasses.replace(base, lam=5.0, hidden=(16,)), tasks_fn)  # not a data field
    assert built == [base]
    cache.get(dataclasses.replace(base, **change), tasks_fn)
    assert built == [base, dataclasses.replace(base, **change)]


def test_worker_seconds_count_a_shared_task_1_and_its_importance_pass_once() -> None:
    from masq.grid.plan import worker_seconds

    base = RunConfig(slt="D3-3-4", hidden=(8,), importance="fisher", lam=1.0)
    shared = {"train": [5.0, 1.0, 1.0], "importance": [2.0, 3.0]}
    runs = [
        (base, shared),
        (base.with_(lam=10.0), shared),  # same task 1, same task-1 Fisher
        (base.with_(importance="none", lam=0.0), {"train": [5.0, 1.0, 1.0], "importance": []}),
        (base.with_(importance="masq"), {"train": [5.0, 1.0, 1.0], "importance": [4.0, 3.0]}),
        (base.with_(seed=1), shared),  # another task-1 state
        (base.with_(importance="si", consolidation="online-ewc"),
         {"train": [4.0, 1.0, 1.0], "importance": [0.5, 0.5]}),  # its own task 1
        (base.with_(lam=100.0), {**shared, "merge": [0.25]}),
    ]  # fmt: skip
    # by hand: seed 0's task 1 (5) once, its Fisher pass (2) and MaSQ pass (4) once each,
    # the later phases (2 per run) and later passes (3 per run that has one) of every run
    seed0 = 5 + 2 + 4 + 5 * 2 + 4 * 3
    seed1 = 5 + 2 + 2 + 3
    si = 4 + 1 + 1 + 0.5 + 0.5
    assert worker_seconds(runs) == pytest.approx(seed0 + seed1 + si + 0.25)
    assert worker_seconds([]) == 0.0
