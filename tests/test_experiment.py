from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from masq import data, runtime
from masq import experiment as ex
from masq.errors import ConfigError
from tests.synthetic import synthetic_dataset

TINY = ex.ExperimentConfig(
    hidden=(16,),
    lr2=1e-3,
    lam=10.0,
    masq_batch=40,
    iters1=20,
    iters2=20,
    batch_size=25,
    eval_every=5,
)


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """masq.data.load returns the tiny synthetic dataset whatever the name."""
    dataset = synthetic_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)


def comparable(result: ex.Result) -> dict:
    """A result without its timings (the only part that differs between identical runs)."""
    d = dataclasses.asdict(result)
    d.pop("timings")
    return d


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr1", 0.0),
        ("lr2", -1e-5),
        ("lr2", float("nan")),
        ("lam", -1.0),
        ("lam", float("inf")),
        ("iters1", 0),
        ("iters2", -5),
        ("batch_size", 0),
        ("masq_batch", 0),
        ("eval_every", 0),
        ("hidden", ()),
        ("hidden", (800, 0)),
        ("importance", "ewc"),
        ("scale", "median"),
        ("fisher_labels", "empirical"),
        ("init", "xavier"),
        ("device", "gpu"),
        ("seed", -1),
        ("slt", "D2-2-2-2-2"),
        ("slt", "X5-5"),
    ],
)
def test_validate_names_the_bad_field(field: str, value: object) -> None:
    config = dataclasses.replace(TINY, **{field: value})
    with pytest.raises(ConfigError) as info:
        config.validate()
    message = str(info.value)
    assert "\n" not in message
    assert field in message or field == "slt"


def test_config_dict_round_trip() -> None:
    config = TINY.with_(hidden=(800, 400, 400), importance="fisher", fisher_labels="sampled")
    d = config.to_dict()
    assert d["hidden"] == [800, 400, 400]
    assert ex.ExperimentConfig.from_dict(json.loads(json.dumps(d))) == config
    with pytest.raises(ConfigError, match="unknown keys"):
        ex.ExperimentConfig.from_dict({**d, "momentum": 0.9})


def test_stream_seeds_are_distinct_and_depend_only_on_the_seed() -> None:
    seeds = {s: ex.stream_seed(0, s) for s in ex.STREAMS}
    assert len(set(seeds.values())) == len(ex.STREAMS)
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert ex.stream_seed(0, "d2-batches") == ex.stream_seed(0, "d2-batches")
    assert ex.stream_seed(0, "d2-batches") != ex.stream_seed(1, "d2-batches")


def test_d2_minibatches_do_not_depend_on_lr2_or_lambda(
    synthetic: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = ex.make_tasks(TINY)
    d1 = ex.train_d1(TINY, tasks)
    seen: list[int] = []
    real = ex.train_task

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(args[2].seed)
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "train_task", spy)
    for changes in ({}, {"lr2": 1e-2}, {"lam": 0.0}, {"importance": "none"}):
        config = TINY.with_(**changes)
        importance, _ = ex.compute_importance(config, d1, tasks)
        ex.retrain_d2(config, d1, importance, tasks)
    assert seen == [ex.stream_seed(TINY.seed, "d2-batches")] * 4


# ----------------------------------------------------------------------------- protocol


def test_run_records_curves_best_last_summary_and_timings(synthetic: None) -> None:
    result = ex.run(TINY)
    for curve in (result.curve_d1, result.curve_d2):
        assert curve["iteration"] == [0, 5, 10, 15, 20]
        assert set(curve) == {"iteration", "D1", "D2", "D1∪D2"}
    assert result.last == {k: v[-1] for k, v in result.curve_d2.items()}
    assert result.best["D1∪D2"] == max(result.curve_d2["D1∪D2"][1:])
    assert set(result.importance_summary) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(set(s) == {"max", "mean"} for s in result.importance_summary.values())
    assert set(result.timings) == {"d1_train", "importance", "d2_train"}
    assert result.meta["device"] == "cpu"


def test_eval_val_adds_the_validation_sets(synthetic: None) -> None:
    result = ex.run(TINY.with_(eval_val=True, importance="none"))
    assert {"val:D1", "val:D2", "val:D1∪D2"} <= set(result.curve_d2)
    assert "val:D1∪D2" in result.best


def test_result_json_round_trip_is_lossless(synthetic: None, tmp_path: Path) -> None:
    result = ex.run(TINY.with_(importance="fisher", fisher_labels="sampled"))
    again = ex.Result.from_json(result.to_json())
    assert again == result
    assert again.to_json() == result.to_json()
    path = result.save(tmp_path / "sub" / "r.json")
    assert ex.Result.load(path) == result
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp files left
    with pytest.raises(ConfigError):
        ex.Result.from_json("{not json")
    with pytest.raises(ConfigError):
        ex.Result.from_json(json.dumps({"config": TINY.to_dict(), "extra": 1}))
    with pytest.raises(ConfigError, match="keys"):
        ex.Result.from_json(json.dumps({"config": TINY.to_dict()}))


@pytest.mark.parametrize("importance", ["masq", "fisher"])
def test_same_seed_same_numbers(synthetic: None, importance: str) -> None:
    config = TINY.with_(importance=importance, fisher_labels="sampled")
    assert comparable(ex.run(config)) == comparable(ex.run(config))
    other = ex.run(config.with_(seed=1))
    assert other.curve_d1 != ex.run(config).curve_d1


def test_lambda_zero_is_plain_retraining(synthetic: None) -> None:
    tasks = ex.make_tasks(TINY)
    d1 = ex.train_d1(TINY, tasks)
    curves = []
    for config in (TINY.with_(lam=0.0), TINY.with_(importance="none")):
        importance, _ = ex.compute_importance(config, d1, tasks)
        curves.append(ex.retrain_d2(config, d1, importance, tasks).curve_d2)
    assert curves[0] == curves[1]


def test_a_strong_penalty_holds_the_d1_state(synthetic: None) -> None:
    tasks = ex.make_tasks(TINY)
    config = TINY.with_(iters2=40, lr2=1e-2)
    d1 = ex.train_d1(config, tasks)
    finals = {}
    for lam in (0.0, 1e9):
        c = config.with_(lam=lam, importance="masq")
        importance, _ = ex.compute_importance(c, d1, tasks)
        finals[lam] = ex.retrain_d2(c, d1, importance, tasks).last["D1"]
    assert finals[1e9] >= finals[0.0]
    assert finals[1e9] == pytest.approx(d1.curve["D1"][-1], abs=0.02)


def test_missing_importance_is_an_error_not_a_zero_penalty(synthetic: None) -> None:
    tasks = ex.make_tasks(TINY)
    d1 = ex.train_d1(TINY, tasks)
    with pytest.raises(ConfigError, match="importance"):
        ex.retrain_d2(TINY, d1, {}, tasks)


def test_a_d1_state_of_another_config_is_refused(synthetic: None) -> None:
    tasks = ex.make_tasks(TINY)
    d1 = ex.train_d1(TINY, tasks)
    with pytest.raises(ConfigError, match="lr1"):
        ex.compute_importance(TINY.with_(lr1=1e-2), d1, tasks)


def test_compare_shares_one_d1_state(synthetic: None) -> None:
    results = ex.compare(TINY)
    assert list(results) == ["none", "fisher", "masq-mean", "masq-sum"]
    first = results["none"]
    assert all(r.curve_d1 == first.curve_d1 for r in results.values())
    assert first.config.lam == 0.0 and first.importance_summary == {}
    mean, total = results["masq-mean"], results["masq-sum"]
    # equal batches of masq_batch = 40 samples (D1 has 150): sum-scale ~ 40 x mean-scale
    ratio = total.importance_summary["0.bias"]["mean"] / mean.importance_summary["0.bias"]["mean"]
    assert 30 < ratio <= 40
    assert [ex.method_label(r.config) for r in results.values()] == [
        "no EWC",
        "EWC+FIM",
        "EWC+MaSQ (mean)",
        "EWC+MaSQ (sum)",
    ]


def test_best_and_last() -> None:
    curve = {
        "iteration": [0, 10, 20, 30],
        "D1": [0.9, 0.5, 0.6, 0.2],
        "D2": [0.0, 0.5, 0.4, 0.9],
        "D1∪D2": [0.95, 0.5, 0.5, 0.55],
    }
    best, last = ex.best_and_last(curve)
    assert best == {"iteration": 30, "D1": 0.2, "D2": 0.9, "D1∪D2": 0.55}  # iteration 0 excluded
    assert last == best
    curve["D1∪D2"] = [0.1, 0.6, 0.6, 0.3]
    best, last = ex.best_and_last(curve)
    assert best["iteration"] == 10 and last["iteration"] == 30  # ties: the earliest
    with pytest.raises(ConfigError):
        ex.best_and_last({"iteration": []})


# ----------------------------------------------------------------------------- runtime


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        runtime.resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        runtime.resolve_device("tpu")


def test_out_dir_checks(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        runtime.check_out_dir(tmp_path / "file")
    assert runtime.check_out_dir(tmp_path / "a" / "b").is_dir()


@pytest.mark.integration
def test_real_mnist_d5_5_forgets_without_ewc() -> None:
    config = ex.ExperimentConfig(
        hidden=(100,), iters1=300, iters2=300, eval_every=100, lr2=1e-3, importance="none"
    )
    result = ex.run(config)
    assert result.curve_d1["D1"][-1] > 0.95  # D1 (digits 0-4) is learnt
    assert result.last["D2"] > 0.9 and result.last["D1"] < 0.3  # ... and forgotten
