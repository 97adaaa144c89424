"""masq.search: grid expansion, de-duplication, shared work, resume, executors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masq import experiment, search, stacked
from masq import tasks as masq_tasks
from masq.errors import ConfigError
from masq.experiment import ExperimentConfig, stream_seed
from masq.results import Store, run_id
from masq.search import Grid, expand
from tests.synthetic import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def synthetic_tasks(config: ExperimentConfig) -> list[masq_tasks.Task]:
    """The tasks of ``config`` built from the tiny synthetic dataset (importable by workers)."""
    data = synthetic_dataset(300, 60, 100)
    return masq_tasks.make(config.slt, dataset=data, seed=stream_seed(config.seed, "tasks"))


def tiny_grid(**changes: object) -> Grid:
    """A small grid of tiny nets: 2 architectures x 2 lr2 x 3 lam = 12 runs, 2 D1 groups."""
    values = dict(
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
    return Grid(**values)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- expansion


def test_paper_preset_is_the_papers_grid() -> None:
    grid = search.load_preset("paper")
    configs = expand(grid)
    assert len(configs) == 3 * 36 * 4 * 4 == grid.size()
    assert len({c.hidden for c in configs}) == 36
    assert {len(c.hidden) for c in configs} == {2, 3}
    assert {c.slt for c in configs} == {"D5-5", "D9-1", "DP10-10"}
    assert {c.lr2 for c in configs} == {1e-3, 1e-4, 1e-5, 1e-6}
    assert {c.lam for c in configs} == {0.0, 100.0, 1000.0, 10000.0}
    assert {(c.iters1, c.iters2, c.lr1, c.batch_size) for c in configs} == {(5000, 5000, 1e-3, 100)}
    masq_runs = [c for c in configs if c.lam > 0]
    assert {(c.importance, c.masq_batch, c.scale) for c in masq_runs} == {("masq", 1000, "mean")}
    assert {c.importance for c in configs if c.lam == 0} == {"none"}
    groups = search.plan(configs)
    assert len(groups) == 108 and all(len(g.configs) == 16 for g in groups)
    assert search.work(groups, 16) == search.Work(1728, 108, 108, 1728, 108)
    assert "paper" in search.list_presets()


def test_architectures_counts() -> None:
    archs = search.architectures((2, 3), (200, 400, 800))
    assert len(archs) == 36 and len(set(archs)) == 36
    assert (800, 400, 400) in archs


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
    grid = Grid(
        slt=tuple(slts),
        hidden=tuple(archs),
        lr2=tuple(lr2),
        lam=tuple(lam),
        seed=tuple(range(seeds)),
        init=tuple(inits),
        scale=tuple(scales),
        masq_batch=tuple(batches),
    )
    configs = expand(grid)
    expected = math.prod(map(len, (slts, archs, lr2, lam, inits, scales, batches))) * seeds
    assert len(configs) == grid.size() == expected
    assert len({run_id(c) for c in configs}) == expected
    # runs of one D1 group are contiguous
    keys = [search.d1_key(c) for c in configs]
    assert (
        len(search.plan(configs))
        == len(dict.fromkeys(keys))
        == len([k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k])
    )


@settings(max_examples=40, deadline=None)
@given(
    lams=st.lists(st.sampled_from([0.0, 1.0, 10.0, 1e3]), min_size=1, unique=True),
    kinds=st.lists(st.sampled_from(["masq", "fisher"]), min_size=1, unique=True),
    scales=st.lists(st.sampled_from(["mean", "sum"]), min_size=1, unique=True),
    labels=st.lists(st.sampled_from(["true", "sampled", "exact"]), min_size=1, unique=True),
    lr2=st.lists(st.sampled_from([1e-2, 1e-3, 1e-4]), min_size=1, unique=True),
)
def test_lambda_zero_and_irrelevant_fields_are_merged(
    lams: list[float], kinds: list[str], scales: list[str], labels: list[str], lr2: list[float]
) -> None:
    grid = Grid(
        lam=tuple(lams),
        importance=tuple(kinds),
        scale=tuple(scales),
        fisher_labels=tuple(labels),
        lr2=tuple(lr2),
    )
    configs = expand(grid)
    per_kind = {"masq": len(scales), "fisher": len(labels)}
    n_imp = sum(per_kind[k] for k in kinds)
    nonzero = len([v for v in lams if v > 0])
    expected = len(lr2) * (nonzero * n_imp + (1 if 0.0 in lams else 0))
    assert len(configs) == expected
    zero = [c for c in configs if c.lam == 0]
    assert all(c.importance == "none" for c in zero)
    assert len(zero) == (len(lr2) if 0.0 in lams else 0)
    assert all(c.fisher_labels == "true" for c in configs if c.importance == "masq")
    assert all(c.scale == "mean" for c in configs if c.importance == "fisher")


def test_lambda_relative_to_lr2_and_both_readings() -> None:
    grid = Grid(lr2=(1e-3, 1e-4), lam=(), lam_per_lr2=(0.0, 0.1, 1.0, 10.0))
    lams = {(c.lr2, c.lam) for c in expand(grid)}
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
    assert search.round_sig(0.1 / 1e-3) == 100.0


def test_grid_from_mapping_and_errors(tmp_path: Path) -> None:
    base = search.load_preset("paper")
    g = search.grid_from_mapping(
        {"slt": "D9-1", "seeds": 3, "hidden": ["800-400-400", [200]]}, base
    )
    assert g.slt == ("D9-1",) and g.seed == (0, 1, 2)
    assert g.hidden == ((800, 400, 400), (200,))
    assert g.lr2 == base.lr2  # untouched axes keep the preset's values
    g2 = search.grid_from_mapping({"lam_per_lr2": [0, 1]}, base)
    assert g2.lam == () and g2.lam_per_lr2 == (0.0, 1.0)  # one λ reading replaces the other
    g3 = search.grid_from_mapping({"layers": 2, "sizes": [10, 20]}, base)
    assert g3.hidden == ((10, 10), (10, 20), (20, 10), (20, 20))
    with pytest.raises(ConfigError, match="unknown grid key 'lr3'"):
        search.grid_from_mapping({"lr3": [1.0]})
    with pytest.raises(ConfigError, match="axis 'lr2' is empty"):
        search.grid_from_mapping({"lr2": []})
    with pytest.raises(ConfigError, match="axis 'lam' is empty"):
        search.grid_from_mapping({"lam": []})
    with pytest.raises(ConfigError, match="takes float values"):
        search.grid_from_mapping({"lr2": ["fast"]})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        search.load_preset("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('slt = ["D5-5"]\nlr2 = [1e-3,\nlam = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml.*malformed TOML.*line 3"):
        search.load_grid_file(bad)
    good = tmp_path / "good.toml"
    good.write_text(
        'slt = ["D5-5", "D9-1"]\nlr2 = [1e-3]\nimportance = ["masq", "fisher"]\n', encoding="utf-8"
    )
    assert search.load_grid_file(good, base).slt == ("D5-5", "D9-1")
    with pytest.raises(ConfigError, match="unknown value 'adam'"):
        expand(Grid(importance=("adam",)))


# ----------------------------------------------------------------------------- execution


class Counter:
    """Wraps the stage functions of masq.experiment and counts calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.d1: list[str] = []
        self.importance: list[str] = []
        self.d2 = 0
        real_d1, real_imp = experiment.train_d1, experiment.compute_importance
        real_stacked, real_d2 = stacked.retrain_d2_stacked, experiment.retrain_d2

        def train_d1(config: ExperimentConfig, tasks: list, **kw: object) -> experiment.D1State:
            self.d1.append(search.d1_key(config))
            return real_d1(config, tasks, **kw)  # type: ignore[arg-type]

        def compute_importance(config: ExperimentConfig, d1: object, tasks: list) -> object:
            assert config.importance != "none"
            self.importance.append(search.importance_key(config))
            return real_imp(config, d1, tasks)  # type: ignore[arg-type]

        def retrain_stacked(configs: list, *a: object, **kw: object) -> list:
            self.d2 += len(configs)
            return real_stacked(configs, *a, **kw)  # type: ignore[arg-type]

        def retrain_d2(config: ExperimentConfig, *a: object, **kw: object) -> object:
            self.d2 += 1
            return real_d2(config, *a, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(experiment, "train_d1", train_d1)
        monkeypatch.setattr(experiment, "compute_importance", compute_importance)
        monkeypatch.setattr(stacked, "retrain_d2_stacked", retrain_stacked)
        monkeypatch.setattr(experiment, "retrain_d2", retrain_d2)


def _records(root: Path) -> dict[str, dict]:
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8"))["result"]
        for p in (root / "runs").glob("*.json")
    }


def test_shared_d1_and_importance_are_computed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = Counter(monkeypatch)
    grid = tiny_grid(importance=("masq", "fisher"))
    configs = expand(grid)
    # 2 archs x 2 lr2 x (1 λ=0 + 2 λ x 2 kinds) = 20 runs
    assert len(configs) == 20
    summary = search.execute(
        configs, tmp_path, stack=4, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    assert summary.done == 20 and not summary.failed
    assert sorted(count.d1) == sorted({search.d1_key(c) for c in configs})  # one per group
    assert len(count.d1) == 2
    assert len(count.importance) == 4 == len(set(count.importance))  # 2 groups x 2 kinds
    assert count.d2 == 20
    assert len(list((tmp_path / "d1").glob("*.pt"))) == 2
    assert len(list((tmp_path / "importance").glob("*.pt"))) == 4
    # every record of a group starts from the same D1 curve
    recs = _records(tmp_path)
    by_arch: dict[tuple, list] = {}
    for r in recs.values():
        by_arch.setdefault(tuple(r["config"]["hidden"]), []).append(r["curve_d1"])
    assert all(all(c == curves[0] for c in curves) for curves in by_arch.values())
    # a second identical call does nothing at all
    again = search.execute(
        configs, tmp_path, stack=4, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    assert again.done == 0 and again.skipped == 20
    assert len(count.d1) == 2 and count.d2 == 20


def test_resume_after_a_crash_recomputes_nothing_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = expand(tiny_grid())
    assert len(configs) == 12
    real = stacked.retrain_d2_stacked
    calls = {"n": 0}

    def crash_on_third(*a: object, **kw: object) -> list:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a crash: not caught per run, stops the whole grid
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(stacked, "retrain_d2_stacked", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        search.execute(
            configs, tmp_path, stack=3, progress=False, tasks_fn=synthetic_tasks, threads=1
        )
    stored = _records(tmp_path)
    assert len(stored) == 6  # two stacks of 3 finished before the crash
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json")}
    monkeypatch.setattr(stacked, "retrain_d2_stacked", real)
    count = Counter(monkeypatch)
    summary = search.execute(
        configs, tmp_path, stack=3, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    assert summary.skipped == 6 and summary.done == 6 and not summary.failed
    assert count.d2 == 6  # only the missing runs
    assert count.d1 == [] and count.importance == []  # both groups: D1 and importance cached
    after = {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json")}
    assert all(after[name] == data for name, data in before.items())  # nothing rewritten
    assert set(_records(tmp_path)) == {run_id(c) for c in configs}
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_kill_9_loses_at_most_the_runs_in_flight(tmp_path: Path) -> None:
    results = tmp_path / "res"
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from masq import search
from tests.test_search import synthetic_tasks, tiny_grid
configs = search.expand(tiny_grid(iters2=(400,), lr2=(1e-2, 1e-3, 1e-4)))
search.execute(configs, {str(results)!r}, stack=1, progress=False, tasks_fn=synthetic_tasks,
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
    summary = search.execute(
        configs, results, stack=6, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    assert summary.skipped == len(stored)
    assert summary.done == len(configs) - len(stored) and not summary.failed


def test_errors_are_recorded_and_the_grid_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = expand(tiny_grid())
    real = experiment.compute_importance

    def fail_for_small(config: ExperimentConfig, d1: object, tasks: list) -> object:
        if config.hidden == (8,):
            raise RuntimeError("importance exploded")
        return real(config, d1, tasks)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "compute_importance", fail_for_small)
    summary = search.execute(
        configs, tmp_path, stack=4, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    failed = {c for c in configs if c.hidden == (8,) and c.lam > 0}
    assert set(summary.failed) == {run_id(c) for c in failed}
    assert summary.done == len(configs) - len(failed)
    errors = Store(tmp_path).error_records()
    assert len(errors) == 4 and "importance exploded" in errors[0]["error"]
    monkeypatch.setattr(experiment, "compute_importance", real)
    retry = search.execute(
        configs, tmp_path, stack=4, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    assert retry.done == 4 and not retry.failed and not Store(tmp_path).error_records()


def _comparable(rec: dict) -> tuple:
    return (
        rec["config"],
        rec["curve_d1"],
        rec["curve_d2"],
        rec["best"],
        rec["last"],
        rec["importance_summary"],
    )


def test_stack_sizes_and_one_by_one_agree(tmp_path: Path) -> None:
    configs = expand(tiny_grid(hidden=((8,),)))
    search.execute(
        configs, tmp_path / "k1", stack=1, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    search.execute(
        configs, tmp_path / "k4", stack=4, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    one, four = _records(tmp_path / "k1"), _records(tmp_path / "k4")
    assert set(one) == set(four)
    for rid in one:
        a, b = one[rid], four[rid]
        assert a["curve_d1"] == b["curve_d1"]
        for key, values in a["curve_d2"].items():
            assert values == pytest.approx(b["curve_d2"][key], abs=0.011)  # <= 1 of 100 samples
        assert b["meta"]["stack"] in (2, 4)


@pytest.mark.slow
def test_process_pool_equals_inline(tmp_path: Path) -> None:
    configs = expand(tiny_grid())
    search.execute(
        configs, tmp_path / "inline", stack=3, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    summary = search.execute(
        configs,
        tmp_path / "pool",
        workers=2,
        stack=3,
        progress=False,
        tasks_fn=synthetic_tasks,
        threads=1,
    )
    assert summary.done == 12 and not summary.failed
    a, b = _records(tmp_path / "inline"), _records(tmp_path / "pool")
    assert {k: _comparable(v) for k, v in a.items()} == {k: _comparable(v) for k, v in b.items()}


@pytest.mark.slow
def test_ray_executor_equals_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    configs = expand(tiny_grid(lam=(0.0, 10.0)))
    search.execute(
        configs, tmp_path / "local", stack=4, progress=False, tasks_fn=synthetic_tasks, threads=1
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = search.execute(
            configs,
            tmp_path / "ray",
            executor="ray",
            stack=4,
            progress=False,
            tasks_fn=synthetic_tasks,
            threads=1,
        )
    finally:
        ray.shutdown()
    assert summary.done == len(configs) == 8 and not summary.failed
    a, b = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert {k: _comparable(v) for k, v in a.items()} == {k: _comparable(v) for k, v in b.items()}


def test_dry_run_estimate_is_positive() -> None:
    groups = search.plan(expand(tiny_grid()))
    est = search.estimate(groups, 4, workers=1, threads=1)
    assert est.total > 0 and est.d2 > 0 and 0 <= est.evaluation <= est.total
    assert est.architectures == 2
    assert search.task_sizes("DP10-10", False) == (55_000, 20_000)
    assert search.task_sizes("D5-5", True) == (27_500, 15_000)


def test_bad_execution_arguments(tmp_path: Path) -> None:
    configs = expand(tiny_grid())
    with pytest.raises(ConfigError, match="--workers"):
        search.execute(configs, tmp_path, workers=0, threads=1)
    with pytest.raises(ConfigError, match="--stack"):
        search.execute(configs, tmp_path, stack=0, threads=1)
    with pytest.raises(ConfigError, match="executor"):
        search.execute(configs, tmp_path, executor="slurm", threads=1)
