"""The T-task protocol (masq.protocol): configs, streams, stages, records and their metrics.

Expected values come from independent computations: stream seeds from hashlib, accuracy
matrices and ACC/BWT/forgetting by hand, EWC penalties from anchors the test builds itself
from the phase-end weights and importances it computes itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from masq import data, importance, runtime
from masq import protocol as pr
from masq.config import RunConfig
from masq.consolidation import ewc, method_label
from masq.errors import ConfigError
from masq.models import mlp
from masq.protocol.result import load_weights, result_from_v1, transfer_metrics
from masq.training import minibatch_indices
from tests.synthetic import synthetic_dataset
from tests.test_wiring import sha_seed

run_module = importlib.import_module("masq.protocol.run")  # masq.protocol.run is the function

TINY = RunConfig(
    hidden=(16,),
    lr2=1e-3,
    lam=10.0,
    masq_batch=40,
    iters1=20,
    iters2=20,
    batch_size=25,
    eval_every=5,
)
# three tasks (classes 0-3, 4-6, 7-9) on the data_learnable dataset: curves that move
T3 = RunConfig(
    slt="D4-3-3",
    hidden=(64,),
    lr1=3e-3,
    lr2=1e-2,
    lam=10.0,
    masq_batch=40,
    iters1=30,
    iters2=40,
    batch_size=25,
    eval_every=5,
    seed=3,
)
GOLDEN = Path(__file__).parent / "data" / "golden_t2_v1.json"


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """masq.data.load returns the tiny synthetic dataset whatever the name."""
    dataset = synthetic_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)


@dataclasses.dataclass
class Call:
    """One train_task call of the protocol: its model, TrainConfig and penalty."""

    model: nn.Module
    seed: int
    penalty: Callable[[nn.Module], Tensor] | None


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every train_task call the protocol makes, in order (the calls still run)."""
    seen: list[Call] = []
    real = run_module.train_task

    def spy(model: nn.Module, train: Any, config: Any, **kwargs: Any) -> Any:
        seen.append(Call(model, config.seed, kwargs.get("penalty_grad")))
        return real(model, train, config, **kwargs)

    monkeypatch.setattr(run_module, "train_task", spy)
    return seen


def comparable(result: pr.Result) -> dict[str, Any]:
    """A record without its clock readings (its timings and the ``finished`` stamp of its
    meta), the only parts that differ between identical runs."""
    d = result.to_dict()
    d.pop("timings")
    d["meta"] = {k: v for k, v in d["meta"].items() if k != "finished"}
    return d


def net_at(config: RunConfig, state: dict[str, Tensor]) -> nn.Sequential:
    """A network of ``config``'s architecture (10 classes, 784 inputs) holding ``state``."""
    model = mlp(config.hidden, init=config.init)
    model.load_state_dict(state)
    return model


def masq_of(config: RunConfig, state: dict[str, Tensor], xy: tuple[Tensor, Tensor]) -> Any:
    """MaSQ of the network at ``state`` on ``xy`` in batches of ``masq_batch``."""
    batches = importance.batches(xy[0], xy[1], config.masq_batch)
    return importance.masq(net_at(config, state), batches, scale=config.scale)


def states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


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
        ("fisher_labels", "posterior"),
        ("init", "xavier"),
        ("consolidation", "l2"),
        ("gamma", 1.5),
        ("gamma", -0.1),
        ("device", "gpu"),
        ("seed", -1),
        ("slt", "D10"),  # one task: no continual learning
        ("slt", "X5-5"),
        ("slt", "D5-4"),
    ],
)
def test_validate_names_the_bad_field(field: str, value: object) -> None:
    config = dataclasses.replace(TINY, **{field: value})
    with pytest.raises(ConfigError) as info:
        config.validate()
    message = str(info.value)
    assert "\n" not in message
    assert field.lower() in message.lower()


@pytest.mark.parametrize(("slt", "n"), [("D5-5", 2), ("D9-1", 2), ("DP10-10", 2), ("D4-3-3", 3),
                                        ("D2-2-2-2-2", 5), ("DP10-10-10-10", 4)])  # fmt: skip
def test_multi_task_slts_are_valid(slt: str, n: int) -> None:
    config = TINY.with_(slt=slt)
    assert config.validate() is config
    assert config.n_tasks == n


def test_config_dict_round_trip() -> None:
    config = TINY.with_(
        hidden=(800, 400, 400),
        importance="fisher",
        fisher_labels="sampled",
        consolidation="online-ewc",
        gamma=0.5,
    )
    d = config.to_dict()
    assert d["hidden"] == [800, 400, 400]
    assert d["consolidation"] == "online-ewc" and d["gamma"] == 0.5
    assert RunConfig.from_dict(json.loads(json.dumps(d))) == config
    with pytest.raises(ConfigError, match="unknown keys"):
        RunConfig.from_dict({**d, "momentum": 0.9})


# ----------------------------------------------------------------------------- streams


def test_stream_seeds_are_sha256_of_seed_and_name() -> None:
    names = [*pr.STREAMS, "d3-batches", "d12-batches", "fisher-labels-d2", "fisher-labels-d10"]
    for seed in (0, 1, 7, 2**40):
        for name in names:
            assert pr.stream_seed(seed, name) == sha_seed(seed, name), (seed, name)
    # pinned: a change of the rule would change the numbers of every stored run
    assert pr.stream_seed(0, "init") == 7479383615121695489
    assert pr.stream_seed(0, "d1-batches") == 5165302694159634706
    assert pr.stream_seed(0, "d2-batches") == 191955381112614340
    assert pr.stream_seed(0, "fisher-labels") == 7777885689101718425
    assert pr.stream_seed(0, "tasks") == 8826930221539292661
    assert pr.stream_seed(7, "d3-batches") == 3813844329874723416
    assert pr.stream_seed(7, "fisher-labels-d2") == 2926519348159770909
    seeds = [pr.stream_seed(0, s) for s in names]
    assert len(set(seeds)) == len(names)
    assert all(0 <= v < 2**63 for v in seeds)
    with pytest.raises(ValueError, match="unknown random stream"):
        pr.stream_seed(0, "d0-batches")


def test_stream_names_of_phases_and_tasks() -> None:
    # the names of a two-task run are those of masq 0.1, so its numbers are unchanged
    assert [pr.batches_stream(p) for p in range(3)] == ["d1-batches", "d2-batches", "d3-batches"]
    assert pr.labels_stream(0) == "fisher-labels"
    assert [pr.labels_stream(t) for t in (1, 2)] == ["fisher-labels-d2", "fisher-labels-d3"]
    assert set(pr.STREAMS) == {
        "tasks",
        "task1-permutation",
        "class-order",
        "init",
        "d1-batches",
        "d2-batches",
        "fisher-labels",
    }


def test_later_minibatches_do_not_depend_on_lr2_or_lambda(
    synthetic: None, calls: list[Call]
) -> None:
    tasks = pr.make_tasks(TINY)
    d1 = pr.train_first(TINY, tasks)
    assert [c.seed for c in calls] == [sha_seed(TINY.seed, "d1-batches")]
    calls.clear()
    for changes in ({}, {"lr2": 1e-2}, {"lam": 0.0}, {"importance": "none"}):
        config = TINY.with_(**changes)
        imp, _ = pr.compute_importance(config, d1, tasks)
        pr.continue_run(config, d1, imp, tasks)
    assert [c.seed for c in calls] == [sha_seed(TINY.seed, "d2-batches")] * 4


# ----------------------------------------------------------------------------- records


def test_run_records_curves_best_last_summary_and_timings(synthetic: None) -> None:
    result = pr.run(TINY)
    assert len(result.curves) == 2
    for curve in result.curves:
        assert curve["iteration"] == [0, 5, 10, 15, 20]
        assert set(curve) == {"iteration", "D1", "D2", "D1∪D2"}
    assert result.last == {k: v[-1] for k, v in result.curves[1].items()}
    assert result.best["D1∪D2"] == max(result.curves[1]["D1∪D2"][1:])
    assert set(result.importance_summary) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(set(s) == {"max", "mean"} for s in result.importance_summary.values())
    assert set(result.timings) == {"train", "importance"}
    assert len(result.timings["train"]) == 2 and len(result.timings["importance"]) == 1
    assert result.meta["device"] == "cpu"


def test_eval_val_adds_the_validation_sets(synthetic: None) -> None:
    result = pr.run(TINY.with_(eval_val=True, importance="none"))
    assert {"val:D1", "val:D2", "val:D1∪D2"} <= set(result.curves[1])
    assert "val:D1∪D2" in result.best


def test_result_json_round_trip_is_lossless(synthetic: None, tmp_path: Path) -> None:
    result = pr.run(TINY.with_(importance="fisher", fisher_labels="sampled"))
    again = pr.Result.from_json(result.to_json())
    assert again == result
    assert again.to_json() == result.to_json()
    path = result.save(tmp_path / "sub" / "r.json")
    assert pr.Result.load(path) == result
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp files left
    with pytest.raises(ConfigError):
        pr.Result.from_json("{not json")
    with pytest.raises(ConfigError):
        pr.Result.from_json(json.dumps({"config": TINY.to_dict(), "extra": 1}))
    with pytest.raises(ConfigError, match="keys"):
        pr.Result.from_json(json.dumps({"config": TINY.to_dict()}))


@pytest.mark.parametrize("kind", ["masq", "fisher"])
def test_same_seed_same_numbers(synthetic: None, kind: str) -> None:
    config = TINY.with_(importance=kind, fisher_labels="sampled")
    first = pr.run(config)
    assert comparable(first) == comparable(pr.run(config))
    assert pr.run(config.with_(seed=1)).curves[0] != first.curves[0]


def test_lambda_zero_is_plain_retraining(synthetic: None) -> None:
    tasks = pr.make_tasks(TINY)
    d1 = pr.train_first(TINY, tasks)
    results = []
    for config in (TINY.with_(lam=0.0), TINY.with_(importance="none")):
        imp, _ = pr.compute_importance(config, d1, tasks)
        results.append(pr.continue_run(config, d1, imp, tasks))
    assert results[0].curves == results[1].curves
    assert states_equal(results[0].weights[-1], results[1].weights[-1])


def test_masq_sum_at_lambda_is_masq_mean_at_b_lambda_when_b_divides_the_task(
    data_learnable: None,
) -> None:
    """MaSQ's two conventions differ by the factor B where every batch is full, so EWC with the
    "sum" importance at λ trains as EWC with the "mean" one at Bλ (the float rounding of the
    product aside): the reason a λ sweep over decades needs only one of the two rows when B, a
    power of ten, divides each task's training set (permuted MNIST: 55,000 / 1,000)."""
    tasks = pr.make_tasks(T3)
    b = 60  # divides the 240 and 180 training samples of tasks 1 and 2 (the third's is not used)
    assert all(int(t.train[0].shape[0]) % b == 0 for t in tasks[:-1])
    mean = T3.with_(importance="masq", scale="mean", masq_batch=b, lam=2.0 * b)
    total = mean.with_(scale="sum", lam=2.0)
    d1 = pr.train_first(mean, tasks)
    runs = [pr.continue_run(c, d1, pr.compute_importance(c, d1, tasks)[0], tasks)
            for c in (mean, total)]  # fmt: skip
    free = pr.continue_run(mean.with_(lam=0.0, importance="none"), d1, {}, tasks)
    for key in runs[0].weights[-1]:
        gap = float((runs[0].weights[-1][key] - runs[1].weights[-1][key]).abs().max())
        moved = float((runs[0].weights[-1][key] - free.weights[-1][key]).abs().max())
        assert gap < 1e-4 and (moved > 1e-2 or key.endswith("bias")), (key, gap, moved)


def test_a_strong_penalty_holds_the_d1_state(synthetic: None) -> None:
    tasks = pr.make_tasks(TINY)
    config = TINY.with_(iters2=40, lr2=1e-2)
    d1 = pr.train_first(config, tasks)
    finals = {}
    for lam in (0.0, 1e9):
        c = config.with_(lam=lam, importance="masq")
        imp, _ = pr.compute_importance(c, d1, tasks)
        finals[lam] = pr.continue_run(c, d1, imp, tasks).last["D1"]
    assert finals[1e9] >= finals[0.0]
    assert finals[1e9] == pytest.approx(d1.curve["D1"][-1], abs=0.02)


def test_missing_importance_is_an_error_not_a_zero_penalty(synthetic: None) -> None:
    tasks = pr.make_tasks(TINY)
    d1 = pr.train_first(TINY, tasks)
    with pytest.raises(ConfigError, match="importance"):
        pr.continue_run(TINY, d1, {}, tasks)


def test_a_d1_state_of_another_config_is_refused(synthetic: None) -> None:
    tasks = pr.make_tasks(TINY)
    d1 = pr.train_first(TINY, tasks)
    with pytest.raises(ConfigError, match="lr1"):
        pr.compute_importance(TINY.with_(lr1=1e-2), d1, tasks)
    with pytest.raises(ConfigError, match="lr1"):
        pr.continue_run(TINY.with_(lr1=1e-2), d1, {}, tasks)


def test_tasks_of_another_slt_are_refused(data_learnable: None) -> None:
    tasks = pr.make_tasks(TINY)  # two tasks
    with pytest.raises(ConfigError, match="3 tasks but 2"):
        pr.train_first(T3, tasks)


def test_compare_shares_one_d1_state(synthetic: None) -> None:
    results = pr.compare(TINY)
    assert list(results) == ["none", "fisher", "masq-mean", "masq-sum"]
    first = results["none"]
    assert all(r.curves[0] == first.curves[0] for r in results.values())
    assert first.config.lam == 0.0 and first.importance_summary == {}
    mean, total = results["masq-mean"], results["masq-sum"]
    # batches of masq_batch = 40 samples (D1 has 150: 40, 40, 40, 30): sum ~ 40 x mean
    ratio = total.importance_summary["0.bias"]["mean"] / mean.importance_summary["0.bias"]["mean"]
    assert 30 < ratio <= 40
    assert [method_label(r.config) for r in results.values()] == [
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
    best, last = pr.best_and_last(curve, "D1∪D2")
    assert best == {"iteration": 30, "D1": 0.2, "D2": 0.9, "D1∪D2": 0.55}  # iteration 0 excluded
    assert last == best
    curve["D1∪D2"] = [0.1, 0.6, 0.6, 0.3]
    best, last = pr.best_and_last(curve, "D1∪D2")
    assert best["iteration"] == 10 and last["iteration"] == 30  # ties: the earliest
    best, _ = pr.best_and_last(curve, "D2")
    assert best["iteration"] == 30
    with pytest.raises(ConfigError):
        pr.best_and_last({"iteration": []}, "D1∪D2")
    with pytest.raises(ConfigError):
        pr.best_and_last(curve, "D1∪D2∪D3")


# ----------------------------------------------------------------------------- T tasks: metrics

# R[i][j]: accuracy on task j at the end of phase i. Task 1 improves in phase 2 (0.6 -> 0.9),
# so forgetting (from the best earlier value) and -BWT (from the diagonal) differ.
HAND_R = [
    [0.6, 0.1, 0.0],
    [0.9, 0.8, 0.2],
    [0.5, 0.7, 0.9],
]


def test_transfer_metrics_of_a_hand_written_matrix() -> None:
    m = transfer_metrics(HAND_R)
    assert set(m) == {"average_accuracy", "bwt", "forgetting"}
    assert m["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.9) / 3, abs=1e-15)
    assert m["bwt"] == pytest.approx(((0.5 - 0.6) + (0.7 - 0.8)) / 2, abs=1e-15)  # -0.1
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2, abs=1e-15)  # 0.25
    two = transfer_metrics([[0.9, 0.0], [0.3, 0.8]])
    assert two["average_accuracy"] == pytest.approx(0.55, abs=1e-15)
    assert two["bwt"] == pytest.approx(-0.6, abs=1e-15)
    assert two["forgetting"] == pytest.approx(0.6, abs=1e-15)
    assert math.isnan(transfer_metrics([[0.7]])["bwt"])


def test_accuracy_matrix_reads_the_last_point_of_each_phase() -> None:
    curves = [
        {"iteration": [0, 5], "D1": [0.1, 0.6], "D2": [0.0, 0.1], "D3": [0.2, 0.0]},
        {"iteration": [0, 5], "D1": [0.6, 0.9], "D2": [0.1, 0.8], "D3": [0.0, 0.2]},
        {"iteration": [0, 5], "D1": [0.9, 0.5], "D2": [0.8, 0.7], "D3": [0.2, 0.9]},
    ]
    assert pr.accuracy_matrix(curves) == HAND_R
    with pytest.raises(ConfigError, match="D3"):
        pr.accuracy_matrix([{k: v for k, v in c.items() if k != "D3"} for c in curves])


@pytest.fixture
def three_task(data_learnable: None, calls: list[Call]) -> tuple[pr.Result, list[Call], list[Any]]:
    """A 3-task EWC+MaSQ run on the data_learnable data, its train_task calls and its tasks."""
    tasks = pr.make_tasks(T3)
    result = pr.run(T3, tasks=tasks)
    return result, list(calls), tasks


def test_three_task_record(three_task: tuple[pr.Result, list[Call], list[Any]]) -> None:
    result, _, _ = three_task
    assert len(result.curves) == 3
    r = result.accuracy
    assert r == [[result.curves[i][f"D{j + 1}"][-1] for j in range(3)] for i in range(3)]
    # ACC, BWT and forgetting written out from R
    acc = (r[2][0] + r[2][1] + r[2][2]) / 3
    bwt = ((r[2][0] - r[0][0]) + (r[2][1] - r[1][1])) / 2
    forgetting = ((max(r[0][0], r[1][0]) - r[2][0]) + (max(r[0][1], r[1][1]) - r[2][1])) / 2
    assert result.metrics["average_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert result.metrics["bwt"] == pytest.approx(bwt, abs=1e-12)
    assert result.metrics["forgetting"] == pytest.approx(forgetting, abs=1e-12)
    # the curves move: task 1 is learnt in phase 1, and the matrix is not trivial
    assert r[0][0] > 0.5 and r[1][1] > 0.5 and r[2][2] > r[0][2]
    # best and last on the union of all tasks in the final phase
    final = result.curves[2]
    union = final["D1∪D2∪D3"]
    candidates = [i for i, it in enumerate(final["iteration"]) if it > 0]
    top = max(union[i] for i in candidates)
    best_i = min(i for i in candidates if union[i] == top)
    assert result.best == {k: v[best_i] for k, v in final.items()}
    assert result.last == {k: v[-1] for k, v in final.items()}
    assert set(result.timings) == {"train", "importance"}
    assert len(result.timings["train"]) == 3 and len(result.timings["importance"]) == 2


def test_union_accuracies_are_pooled_counts(
    three_task: tuple[pr.Result, list[Call], list[Any]],
) -> None:
    result, _, tasks = three_task
    sizes = [len(t.test[1]) for t in tasks]
    for phase, curve in enumerate(result.curves):
        for i in range(len(curve["iteration"])):
            correct = [round(curve[f"D{j + 1}"][i] * sizes[j]) for j in range(3)]
            assert curve["D1∪D2∪D3"][i] == pytest.approx(sum(correct) / sum(sizes), abs=1e-12)
            if phase == 1:
                pooled = (correct[0] + correct[1]) / (sizes[0] + sizes[1])
                assert curve["D1∪D2"][i] == pytest.approx(pooled, abs=1e-12)


def test_eval_sets_of_each_phase(data_learnable: None) -> None:
    tasks = pr.make_tasks(T3)
    names = ("D1", "D2", "D3")
    for phase in range(3):
        sets, unions = pr.eval_sets(T3, tasks, phase)
        assert list(sets) == list(names)
        for name, task in zip(names, tasks, strict=True):
            assert sets[name] is task.test
        expected = {"D1∪D2∪D3": names}
        if phase == 1:  # 1 < t < T (1-based): the union of the tasks seen so far as well
            expected["D1∪D2"] = names[:2]
        assert unions == expected, phase
    sets, unions = pr.eval_sets(T3.with_(eval_val=True), tasks, 1)
    assert set(sets) == {*names, "val:D1", "val:D2", "val:D3"}
    for name, task in zip(names, tasks, strict=True):
        assert sets["val:" + name] is task.val
    assert unions == {
        "D1∪D2": ("D1", "D2"),
        "D1∪D2∪D3": names,
        "val:D1∪D2": ("val:D1", "val:D2"),
        "val:D1∪D2∪D3": ("val:D1", "val:D2", "val:D3"),
    }
    # five tasks: the union of the tasks seen so far in phases 2, 3, 4 only
    five = T3.with_(slt="D2-2-2-2-2")
    tasks5 = pr.make_tasks(five)
    seen = [sorted(pr.eval_sets(five, tasks5, p)[1]) for p in range(5)]
    assert seen == [
        ["D1∪D2∪D3∪D4∪D5"],
        ["D1∪D2", "D1∪D2∪D3∪D4∪D5"],
        ["D1∪D2∪D3", "D1∪D2∪D3∪D4∪D5"],
        ["D1∪D2∪D3∪D4", "D1∪D2∪D3∪D4∪D5"],
        ["D1∪D2∪D3∪D4∪D5"],
    ]


def test_curves_of_each_phase_hold_its_sets(data_learnable: None) -> None:
    result = pr.run(T3.with_(eval_val=True, importance="none", iters1=10, iters2=10))
    tests = {"D1", "D2", "D3", "D1∪D2∪D3"}
    vals = {"val:" + n for n in tests}
    assert set(result.curves[0]) == {"iteration", *tests, *vals}
    assert set(result.curves[1]) == {"iteration", *tests, *vals, "D1∪D2", "val:D1∪D2"}
    assert set(result.curves[2]) == {"iteration", *tests, *vals}
    assert "val:D1∪D2∪D3" in result.best and "val:D1∪D2∪D3" in result.last


# ----------------------------------------------------------------------------- T tasks: EWC


def test_ewc_with_three_tasks_sums_one_penalty_per_earlier_task(
    three_task: tuple[pr.Result, list[Call], list[Any]],
) -> None:
    result, seen, tasks = three_task
    assert [c.seed for c in seen] == [sha_seed(T3.seed, f"d{t}-batches") for t in (1, 2, 3)]
    assert seen[0].penalty is None
    w = result.weights
    assert w is not None and len(w) == 3
    f1 = masq_of(T3, w[0], tasks[0].train)  # task 1's importance at the end of phase 1
    f2 = masq_of(T3, w[1], tasks[1].train)  # task 2's at the end of phase 2
    a1 = ewc.anchor(net_at(T3, w[0]), f1)
    a2 = ewc.anchor(net_at(T3, w[1]), f2)
    at_end = net_at(T3, w[2])
    expected3 = autograd_grad(at_end, ewc.penalty(at_end, [a1, a2], T3.lam))
    only_latest = autograd_grad(at_end, ewc.penalty(at_end, [a2], T3.lam))
    assert seen[2].penalty is not None and seen[1].penalty is not None
    got3 = added_grad(seen[2].penalty, at_end)
    for k in expected3:
        torch.testing.assert_close(got3[k], expected3[k], rtol=1e-5, atol=1e-9)
    assert any(  # the task-1 term counts
        not torch.allclose(expected3[k], only_latest[k], rtol=1e-3) for k in expected3
    )
    # phase 2 sees task 1's anchor only: the gradient λ F1 (θ - θ1), written out in float64
    at_two = net_at(T3, w[1])
    got2 = added_grad(seen[1].penalty, at_two)
    for k, p in at_two.named_parameters():
        by_hand = T3.lam * f1[k].double() * (p.detach().double() - w[0][k].double())
        torch.testing.assert_close(got2[k].double(), by_hand, rtol=1e-5, atol=1e-12)
    # the recorded summary is task 1's importance
    assert result.importance_summary == {
        k: {"max": float(v.max()), "mean": float(v.double().mean())} for k, v in f1.items()
    }


def autograd_grad(model: nn.Module, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂ value / ∂ θ for every parameter of ``model``, by autograd."""
    names, params = zip(*model.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(value, params), strict=True))


def added_grad(penalty_grad: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``penalty_grad`` adds to zero gradients of ``model``'s parameters."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    penalty_grad(model)
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_online_ewc_with_two_tasks_is_plain_ewc(data_learnable: None, gamma: float) -> None:
    config = T3.with_(slt="D5-5")
    tasks = pr.make_tasks(config)
    plain = pr.run(config, tasks=tasks)
    online = pr.run(config.with_(consolidation="online-ewc", gamma=gamma), tasks=tasks)
    assert online.curves == plain.curves
    assert online.accuracy == plain.accuracy
    assert online.best == plain.best and online.last == plain.last
    assert plain.weights is not None and online.weights is not None
    assert all(states_equal(a, b) for a, b in zip(plain.weights, online.weights, strict=True))


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_online_ewc_with_three_tasks_decays_the_importance_and_keeps_the_latest_anchor(
    data_learnable: None, calls: list[Call], gamma: float
) -> None:
    config = T3.with_(consolidation="online-ewc", gamma=gamma)
    tasks = pr.make_tasks(config)
    result = pr.run(config, tasks=tasks)
    w = result.weights
    assert w is not None
    f1 = masq_of(config, w[0], tasks[0].train)
    f2 = masq_of(config, w[1], tasks[1].train)
    running = {k: gamma * f1[k] + f2[k] for k in f1}
    at_end = net_at(config, w[2])
    expected = autograd_grad(
        at_end, ewc.penalty(at_end, ewc.anchor(net_at(config, w[1]), running), config.lam)
    )
    assert calls[2].penalty is not None
    got = added_grad(calls[2].penalty, at_end)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-9)
    two_anchors = autograd_grad(
        at_end,
        ewc.penalty(
            at_end,
            [ewc.anchor(net_at(config, w[0]), f1), ewc.anchor(net_at(config, w[1]), f2)],
            config.lam,
        ),
    )
    assert any(  # not plain EWC
        not torch.allclose(expected[k], two_anchors[k], rtol=1e-3) for k in expected
    )
    assert calls[1].penalty is not None  # phase 2: task 1's anchor, F = F1
    at_two = net_at(config, w[1])
    one = autograd_grad(
        at_two, ewc.penalty(at_two, ewc.anchor(net_at(config, w[0]), f1), config.lam)
    )
    got_two = added_grad(calls[1].penalty, at_two)
    for k in one:
        torch.testing.assert_close(got_two[k], one[k], rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- weights, records


def test_keep_weights_gives_the_state_at_the_end_of_each_phase(
    three_task: tuple[pr.Result, list[Call], list[Any]], tmp_path: Path
) -> None:
    result, seen, _ = three_task
    assert result.weights is not None and len(result.weights) == 3
    assert states_equal(result.weights[-1], seen[-1].model.state_dict())  # the final model
    # phase 1's state is the D1 state (trained again here, independently of the run)
    tasks = pr.make_tasks(T3)
    assert states_equal(result.weights[0], pr.train_first(T3, tasks).state_dict)
    assert not states_equal(result.weights[0], result.weights[1])
    assert not states_equal(result.weights[1], result.weights[2])
    paths = result.save_weights(tmp_path / "w", "run")
    assert [p.name for p in paths] == [f"run_phase{t}.safetensors" for t in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [p.name for p in paths]
    for path, state in zip(paths, result.weights, strict=True):
        assert states_equal(load_weights(path), state)
    # the record does not carry them, and a run without them cannot save them
    again = pr.Result.from_json(result.to_json())
    assert again.weights is None
    with pytest.raises(ConfigError, match="keep_weights"):
        again.save_weights(tmp_path / "none")
    lean = pr.run(T3.with_(importance="none", iters1=5, iters2=5), tasks=tasks, keep_weights=False)
    assert lean.weights is None


def test_three_task_result_json_round_trip(
    three_task: tuple[pr.Result, list[Call], list[Any]], tmp_path: Path
) -> None:
    result, _, _ = three_task
    again = pr.Result.from_json(result.to_json())
    assert again == result
    assert again.accuracy == result.accuracy and again.metrics == result.metrics
    assert again.curves[1]["D1∪D2"] == result.curves[1]["D1∪D2"]
    assert again.to_json() == result.to_json()
    assert pr.Result.load(result.save(tmp_path / "r.json")) == result


def golden_records() -> Iterator[dict[str, Any]]:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    yield from (rec["result"] for rec in golden["separate"])


def test_result_from_v1_keeps_every_number() -> None:
    for v1 in golden_records():
        out = result_from_v1(v1)
        assert out["config"] == v1["config"]
        assert out["curves"] == [v1["curve_d1"], v1["curve_d2"]]
        assert out["best"] == v1["best"] and out["last"] == v1["last"]
        assert out["importance_summary"] == v1["importance_summary"]
        c1, c2 = v1["curve_d1"], v1["curve_d2"]
        r = [[c1["D1"][-1], c1["D2"][-1]], [c2["D1"][-1], c2["D2"][-1]]]
        assert out["accuracy"] == r
        assert out["metrics"]["average_accuracy"] == pytest.approx((r[1][0] + r[1][1]) / 2)
        assert out["metrics"]["bwt"] == pytest.approx(r[1][0] - r[0][0])
        assert out["metrics"]["forgetting"] == pytest.approx(r[0][0] - r[1][0])
        assert out["meta"]["migrated_from"] == 1
        assert all(math.isnan(s) for s in out["timings"]["train"] + out["timings"]["importance"])
        result = pr.Result.from_dict(out)  # a valid format-2 record
        assert result.config == RunConfig.from_dict(v1["config"])
        assert result.curves == out["curves"] and result.best == v1["best"]
    timed = {**v1, "timings": {"d1_train": 1.5, "importance": 0.25, "d2_train": 2.0}}
    assert result_from_v1(timed)["timings"] == {"train": [1.5, 2.0], "importance": [0.25]}


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
    config = RunConfig(
        hidden=(100,), iters1=300, iters2=300, eval_every=100, lr2=1e-3, importance="none"
    )
    result = pr.run(config)
    assert result.curves[0]["D1"][-1] > 0.95  # D1 (digits 0-4) is learnt
    assert result.last["D2"] > 0.9 and result.last["D1"] < 0.3  # ... and forgotten


# ----------------------------------------------------------------------------- adam_state keep


def test_adam_state_keep_is_one_adam_through_every_phase(data_learnable: None) -> None:
    """A three-task fine-tuning run with adam_state keep equals an independent loop: one
    torch.optim.Adam over the network through all three tasks, lr1 then lr2, the phases'
    mini-batch streams; with reset (the default) each phase starts a fresh Adam."""
    config = T3.with_(importance="none", lam=0.0, adam_state="keep")
    tasks = pr.make_tasks(config)
    result = pr.run(config, tasks=tasks)
    ref = pr.build_model(config, tasks)
    adam = torch.optim.Adam(ref.parameters(), lr=config.lr1, foreach=False)
    for phase, task in enumerate(tasks):
        lr, iters = (config.lr1, config.iters1) if phase == 0 else (config.lr2, config.iters2)
        for group in adam.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(
            pr.stream_seed(config.seed, f"d{phase + 1}-batches")
        )
        x, y = task.train
        for idx in minibatch_indices(x.shape[0], config.batch_size, iters, generator):
            loss = torch.nn.functional.cross_entropy(ref(x[idx]), y[idx])
            adam.zero_grad()
            loss.backward()
            adam.step()
        assert result.weights is not None
        for name, p in ref.state_dict().items():
            torch.testing.assert_close(result.weights[phase][name], p, rtol=1e-4, atol=1e-6)
    reset = pr.run(config.with_(adam_state="reset"), tasks=tasks)
    assert reset.weights is not None
    assert states_equal(reset.weights[0], result.weights[0])  # phase 1 is the same training
    assert not torch.allclose(reset.weights[-1]["0.weight"], result.weights[-1]["0.weight"])


def test_adam_state_keep_needs_the_moments_of_task_1(data_learnable: None) -> None:
    config = T3.with_(importance="none", lam=0.0, adam_state="keep", iters1=5, iters2=5)
    tasks = pr.make_tasks(config)
    d1 = pr.train_first(config, tasks)
    assert d1.adam is not None and d1.adam.step == 5
    assert pr.train_first(config.with_(adam_state="reset"), tasks).adam is None
    lost = dataclasses.replace(d1, adam=None)
    with pytest.raises(ConfigError, match="no Adam state") as err:
        pr.continue_run(config, lost, {}, tasks)
    assert "\n" not in str(err.value)
