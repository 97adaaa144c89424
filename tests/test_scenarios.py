"""The three scenarios (masq.scenarios): relabelling, heads, masking in training, evaluation and
the stacked engine, and runs in each scenario through the protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masq import protocol, scenarios, tasks
from masq.config import RunConfig, Scenario
from masq.errors import ConfigError
from masq.runid import id_dict, run_id
from masq.stacked import Workspace, loss_grads, stack_state, stacked_accuracies
from masq.training import TrainConfig, eval_counts, train_task
from tests.synthetic import synthetic_dataset


@pytest.fixture(scope="module")
def split() -> list[tasks.Task]:
    return tasks.make("D2-2-2-2-2", dataset=synthetic_dataset(), seed=0)


@pytest.fixture(scope="module")
def permuted() -> list[tasks.Task]:
    return tasks.make("DP10-10-10", dataset=synthetic_dataset(), seed=0)


def parts(task: tasks.Task) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [task.train, task.val, task.test]


def test_class_scenario_leaves_every_task_unchanged(split: list[tasks.Task]) -> None:
    assert scenarios.apply_scenario(split, "class") == split
    assert scenarios.n_outputs(split) == 10


def test_task_scenario_on_split_mnist_masks_the_shared_head(split: list[tasks.Task]) -> None:
    out = scenarios.apply_scenario(split, Scenario.TASK)
    assert scenarios.n_outputs(out) == 10  # the same network as the class scenario
    for before, after in zip(split, out, strict=True):
        assert after.units == before.classes and after.labels == before.classes
        for (x0, y0), (x1, y1) in zip(parts(before), parts(after), strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_task_scenario_on_permuted_mnist_gives_each_task_its_own_units(
    permuted: list[tasks.Task],
) -> None:
    out = scenarios.apply_scenario(permuted, "task")
    assert scenarios.n_outputs(out) == 30
    for t, (before, after) in enumerate(zip(permuted, out, strict=True)):
        assert after.units == tuple(range(10 * t, 10 * t + 10))
        for (_, y0), (_, y1) in zip(parts(before), parts(after), strict=True):
            assert torch.equal(y1, y0 + 10 * t)


def test_domain_scenario_maps_every_task_onto_one_label_set(split: list[tasks.Task]) -> None:
    out = scenarios.apply_scenario(split, "domain")
    assert scenarios.n_outputs(out) == 2
    for before, after in zip(split, out, strict=True):
        assert after.units is None and after.labels == (0, 1)
        for (_, y0), (_, y1) in zip(parts(before), parts(after), strict=True):
            assert torch.equal(y1, (y0 == before.classes[1]).long())  # first/second digit
    assert all(t.labels == tuple(range(10)) for t in scenarios.apply_scenario(
        tasks.make("DP10-10", dataset=synthetic_dataset(), seed=0), "domain"))  # fmt: skip


def test_class_blocks_makes_each_permuted_tasks_classes_new_with_every_unit_active(
    permuted: list[tasks.Task], split: list[tasks.Task]
) -> None:
    out = scenarios.apply_scenario(permuted, "class-blocks")
    assert scenarios.n_outputs(out) == 30  # one block of 10 labels per task
    for t, (before, after) in enumerate(zip(permuted, out, strict=True)):
        assert after.units is None  # no task identity: nothing masked
        assert after.labels == tuple(range(10 * t, 10 * t + 10))
        for (x0, y0), (x1, y1) in zip(parts(before), parts(after), strict=True):
            assert torch.equal(x0, x1) and torch.equal(y1, y0 + 10 * t)
    assert scenarios.apply_scenario(split, "class-blocks") == split  # disjoint: as class


def test_a_class_blocks_run_learns_the_permutations_apart(data_learnable: None) -> None:
    # 256 units, 600 iterations: with fewer most ReLUs are dead by the third task (this data)
    small = {**SMALL, "slt": "DP10-10-10", "hidden": (256,), "iters1": 600, "iters2": 600}
    config = RunConfig(**small, scenario="class-blocks", importance="none", lam=0.0)
    result = protocol.run(config)
    assert min(result.accuracy[t][t] for t in range(3)) > 0.8  # each task when learned
    assert result.accuracy[-1][0] < 0.2  # then forgotten: no task identity, 30-way head
    assert run_id(config) != run_id(config.with_(scenario="class"))


@settings(max_examples=30, deadline=None)
@given(
    order=st.permutations(list(range(10))),
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=5).filter(lambda s: sum(s) <= 10),
    kind=st.sampled_from(["task", "domain"]),
)
def test_relabelling_is_a_bijection_per_task_into_the_head(
    order: list[int], sizes: list[int], kind: str
) -> None:
    """Over random class splits: each task's classes go one-to-one onto labels inside the head,
    alike in train, val and test, and no image changes."""
    sizes = [*sizes, 10 - sum(sizes)] if sum(sizes) < 10 else sizes
    spec = "D" + "-".join(map(str, sizes)) + ":" + ",".join(map(str, order))
    base = tasks.make(spec, dataset=synthetic_dataset(60, 20, 20), seed=0)
    out = scenarios.apply_scenario(base, kind)
    n = scenarios.n_outputs(out)
    for before, after in zip(base, out, strict=True):
        assert after.labels is not None and len(set(after.labels)) == len(before.classes)
        mapping = dict(zip(before.classes, after.labels, strict=True))
        for (x0, y0), (x1, y1) in zip(parts(before), parts(after), strict=True):
            assert torch.equal(x0, x1)
            assert y1.tolist() == [mapping[int(c)] for c in y0]
            assert all(0 <= v < n for v in y1.tolist())


@settings(max_examples=30, deadline=None)
@given(
    order=st.permutations(list(range(10))),
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=5).filter(lambda s: sum(s) <= 10),
)
def test_the_class_scenario_changes_nothing_and_keeps_the_head_rule(
    order: list[int], sizes: list[int]
) -> None:
    """class: the very tasks and tensors; n_outputs == max(max(t.classes)) + 1, the head rule
    of the code before the scenarios (protocol.build_model)."""
    sizes = [*sizes, 10 - sum(sizes)] if sum(sizes) < 10 else sizes
    spec = "D" + "-".join(map(str, sizes)) + ":" + ",".join(map(str, order))
    base = tasks.make(spec, dataset=synthetic_dataset(60, 20, 20), seed=0)
    out = scenarios.apply_scenario(base, Scenario.CLASS)
    assert len(out) == len(base) and all(a is b for a, b in zip(out, base, strict=True))
    for before, after in zip(base, out, strict=True):
        assert after.labels is None and after.units is None
        for (x0, y0), (x1, y1) in zip(parts(before), parts(after), strict=True):
            assert x0 is x1 and y0 is y1
    assert scenarios.n_outputs(out) == max(max(t.classes) for t in base) + 1


@settings(max_examples=10, deadline=None)
@given(n_tasks=st.integers(2, 4), kind=st.sampled_from(["task", "domain"]))
def test_permuted_tasks_relabel_alike_in_every_part(n_tasks: int, kind: str) -> None:
    """Permuted tasks (every task has 0..9): task gives task t the block t·10 + y, domain
    keeps y; the inputs are untouched, the originals too (no in-place relabelling)."""
    spec = "DP" + "-".join(["10"] * n_tasks)
    base = tasks.make(spec, dataset=synthetic_dataset(40, 20, 20), seed=1)
    saved = [[y.clone() for _, y in parts(t)] for t in base]
    out = scenarios.apply_scenario(base, kind)
    n = scenarios.n_outputs(out)
    assert n == (10 * n_tasks if kind == "task" else 10)
    for t, (before, after) in enumerate(zip(base, out, strict=True)):
        shift = 10 * t if kind == "task" else 0
        assert after.units == (tuple(range(shift, shift + 10)) if kind == "task" else None)
        for (x0, y0), (x1, y1), y_saved in zip(parts(before), parts(after), saved[t], strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y_saved)
            assert torch.equal(y1, y0 + shift) and int(y1.max()) < n


def test_n_outputs_covers_labels_and_units() -> None:
    """The head holds every label and every active unit, whichever is larger."""
    xy = (torch.zeros(1, 4), torch.zeros(1, dtype=torch.int64))
    task = tasks.Task("D1", (0, 1), None, xy, xy, xy)
    assert scenarios.n_outputs([task]) == 2
    assert scenarios.n_outputs([dataclasses.replace(task, units=(0, 1, 7))]) == 8
    assert scenarios.n_outputs([dataclasses.replace(task, labels=(5, 6))]) == 7
    with pytest.raises(ConfigError, match="no tasks"):
        scenarios.n_outputs([])


@pytest.mark.parametrize("spec", ["D2-2-2-2-2", "D5-5", "D9-1", "DP10-10-10", "D3-3-4"])
@pytest.mark.parametrize("kind", [s.value for s in Scenario])
def test_head_size_without_images_is_the_head_of_the_built_tasks(spec: str, kind: str) -> None:
    """The estimate's head (from the SLT's classes alone) is the one a run builds."""
    from masq.slt import parse_spec

    built = tasks.make(spec, dataset=synthetic_dataset(40, 20, 20), seed=0)
    expected = scenarios.n_outputs(scenarios.apply_scenario(built, kind))
    assert scenarios.head_size(parse_spec(spec).task_classes, kind) == expected


def test_head_bias_refuses_units_outside_the_head() -> None:
    for bad in [(), (0, 5), (-1, 2)]:
        with pytest.raises(ConfigError, match="units"):
            scenarios.head_bias(bad, 5)


def test_head_bias_masks_exactly_the_other_units() -> None:
    assert scenarios.head_bias(None, 5) is None
    bias = scenarios.head_bias((1, 3), 5)
    assert bias is not None
    assert bias.tolist() == [float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")]


def test_masked_evaluation_and_training_use_only_the_tasks_units() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    x = torch.randn(50, 4)
    y = torch.randint(2, 4, (50,))
    units = {"D2": (2, 3)}
    masked = eval_counts(model, {"D2": (x, y)}, units=units)["D2"][0]
    logits = model(x).detach()[:, [2, 3]]
    assert masked == int((logits.argmax(1) + 2 == y).sum())
    # training with the mask never moves the rows of the other units
    before = model[0].weight.detach().clone()
    train_task(model, (x, y), TrainConfig(lr=1e-2, iters=5, batch_size=10), units=(2, 3))
    moved = (model[0].weight.detach() - before).abs().sum(1)
    assert moved[[0, 1, 4, 5]].eq(0).all() and moved[[2, 3]].gt(0).all()


def test_the_stacked_engine_masks_like_autograd() -> None:
    """loss_grads with a head bias equals autograd of the masked mean cross-entropy, and
    stacked evaluation with units equals masked eval_counts."""
    from masq.models import mlp

    net = mlp((7,), in_features=5, classes=6, seed=3)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    stacked = stack_state(state, 2)
    x, y = torch.randn(9, 5), torch.randint(3, 5, (9,))
    bias = scenarios.head_bias((3, 4), 6)
    grads = loss_grads(stacked, Workspace.create(stacked, 9), x, y, bias)
    loss = torch.nn.functional.cross_entropy(net(x) + bias, y)
    auto = torch.autograd.grad(loss, [net[0].weight, net[0].bias, net[2].weight, net[2].bias])
    for got, want in zip(grads, auto, strict=True):
        got0 = got[0].t() if got[0].ndim == 2 else got[0]
        torch.testing.assert_close(got0, want, rtol=1e-5, atol=1e-6)
    accs = stacked_accuracies(stacked, {"D2": (x, y)}, {}, units={"D2": (3, 4)})
    count = eval_counts(net, {"D2": (x, y)}, units={"D2": (3, 4)})["D2"]
    assert accs[0]["D2"] == accs[1]["D2"] == count[0] / count[1]


def test_the_scenario_is_in_the_run_id_only_off_its_default() -> None:
    base = RunConfig(slt="D2-2-2-2-2")
    assert run_id(base) == run_id(base.with_(scenario="class"))
    ids = {run_id(base.with_(scenario=s)) for s in ("class", "task", "domain")}
    assert len(ids) == 3


SMALL = {"slt": "D2-2-2-2-2", "hidden": (32,), "iters1": 60, "iters2": 60, "batch_size": 20,
         "eval_every": 30, "lr1": 1e-3, "lr2": 1e-3, "masq_batch": 50}  # fmt: skip


def test_task_incremental_keeps_earlier_tasks_without_any_consolidation(
    data_learnable: None,
) -> None:
    """With the task identity given, plain fine-tuning keeps the earlier tasks far above the
    chance of their 2-way heads, while the class scenario forgets them."""
    task_il = protocol.run(RunConfig(**SMALL, scenario="task", importance="none", lam=0.0))
    class_il = protocol.run(RunConfig(**SMALL, importance="none", lam=0.0))
    earlier_task = sum(task_il.accuracy[-1][:-1]) / 4
    earlier_class = sum(class_il.accuracy[-1][:-1]) / 4
    assert earlier_task > 0.8 and earlier_class < 0.2


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_stacked_equals_separate_in_every_scenario(data_learnable: None, scenario: str) -> None:
    config = RunConfig(**{**SMALL, "slt": "D5-5"}, scenario=scenario, importance="fisher",
                       lam=50.0)  # fmt: skip
    run_tasks = protocol.make_tasks(config)
    d1 = protocol.train_first(config, run_tasks)
    imp, _ = protocol.compute_importance(config, d1, run_tasks)
    configs = [config, config.with_(lam=0.0, importance="none"), config.with_(lr2=3e-3)]
    imps = [imp, {}, imp]
    separate = [
        protocol.continue_run(c, d1, i, run_tasks) for c, i in zip(configs, imps, strict=True)
    ]
    stacked = protocol.continue_stacked(configs, d1, imps, run_tasks)
    for a, b in zip(separate, stacked, strict=True):
        for name in a.curves[1]:
            assert a.curves[1][name] == pytest.approx(b.curves[1][name], abs=2e-2), name
    assert dataclasses.asdict(configs[0]) == dataclasses.asdict(config)


TINY = {**SMALL, "slt": "D3-3-4", "iters1": 20, "iters2": 20, "eval_every": 10,
        "fisher_samples": 40}  # fmt: skip


@pytest.mark.parametrize("scenario", ["class", "task", "domain"])
def test_every_measure_and_method_runs_through_the_grid_in_every_scenario(
    data_learnable: None, scenario: str, tmp_path
) -> None:
    """Every registered measure with EWC (and online EWC where it sums), and every other
    method, through masq.grid.execute: one finite record each, stored, in three tasks."""
    from masq import grid, store
    from masq.consolidation import METHODS, canonical
    from masq.importance import MEASURES

    base = RunConfig(**TINY, scenario=scenario, lam=10.0)
    configs = [base.with_(importance=m, fisher_labels="exact") for m in sorted(MEASURES)]
    configs += [
        base.with_(importance=m, consolidation="online-ewc", gamma=1.0)
        for m, measure in sorted(MEASURES.items())
        if measure.kind == "diagonal" and measure.gives_importance
    ]
    configs += [base.with_(importance="fisher", consolidation=name) for name in sorted(METHODS)]
    unique = {run_id(canonical(c)): canonical(c) for c in configs}
    summary = grid.execute(list(unique.values()), tmp_path, workers=1, progress=False)
    assert not summary.failed and summary.done == len(unique)
    df = store.load(tmp_path)
    assert len(df) == len(unique)
    assert df["last.union"].notna().all()
    assert set(df["importance"]) >= {m for m in MEASURES if m != "none"}


# ----------------------------------------------------------------------------- seen units


def test_seen_units_are_the_classes_of_the_tasks_so_far(
    split: list[tasks.Task], permuted: list[tasks.Task]
) -> None:
    seen: list[int] = []
    for phase, task in enumerate(split):
        seen += list(task.classes)
        view = scenarios.seen_units(split, phase)
        for before, after in zip(split, view, strict=True):
            assert after.units == tuple(sorted(seen))
            assert after.train is before.train and after.classes == before.classes
    assert set(scenarios.seen_units(split, 4)[0].units or ()) == set(range(10))
    blocks = scenarios.apply_scenario(permuted, "class-blocks")
    assert scenarios.seen_units(blocks, 1)[2].units == tuple(range(20))  # labels, not classes
    with pytest.raises(ConfigError, match="units of their own"):
        scenarios.seen_units(scenarios.apply_scenario(split, "task"), 0)
    with pytest.raises(ConfigError, match="phase 5"):
        scenarios.seen_units(split, 5)


def test_class_units_seen_leaves_the_units_of_unseen_classes_untouched(
    data_learnable: None,
) -> None:
    """With class_units seen a class's output row (weights and bias) gets no gradient, so no
    Adam step and no importance, until its task comes: it is still at its initial value after
    the phases before (an identity independent of the masking code); its task's accuracy is 0
    until then, and after the last phase every unit counts. With every unit active the rows
    move from phase 1 on."""
    three = {**SMALL, "slt": "D4-3-3", "adam_state": "keep"}
    seen = RunConfig(**three, class_units="seen", importance="fisher", fisher_labels="exact",
                     lam=100.0)  # fmt: skip
    tasks_ = protocol.make_tasks(seen)
    start = protocol.build_model(seen, tasks_).state_dict()
    result = protocol.run(seen)
    every = protocol.run(seen.with_(class_units="all"))
    assert result.weights is not None and every.weights is not None
    rows = [list(t.classes) for t in tasks_]  # 0-3, 4-6, 7-9
    for key in ("2.weight", "2.bias"):
        for phase in range(3):
            later = [c for r in rows[phase + 1 :] for c in r]
            now = result.weights[phase][key]
            assert torch.equal(now[later], start[key][later]), (key, phase)
            assert not torch.equal(now[rows[phase]], start[key][rows[phase]])
        assert not torch.equal(every.weights[0][key][rows[1]], start[key][rows[1]])
    d1 = protocol.train_first(seen, tasks_)
    imp, _ = protocol.compute_importance(seen, d1, tasks_)
    assert float(imp["2.weight"][rows[1] + rows[2]].abs().sum()) == 0.0
    assert float(imp["2.weight"][rows[0]].abs().sum()) > 0.0
    assert result.accuracy[0][1:] == [0.0, 0.0] and result.accuracy[1][2] == 0.0
    assert result.accuracy[0][0] > 0.6  # task 1 among its own 4 classes
    assert "class_units" not in id_dict(seen.with_(class_units="all"))
    assert run_id(seen) != run_id(seen.with_(class_units="all"))


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_class_units_seen_is_refused_outside_the_class_incremental_scenarios(
    scenario: str,
) -> None:
    with pytest.raises(ConfigError, match="class_units: seen applies"):
        RunConfig(slt="D4-3-3", scenario=scenario, class_units="seen").validate()
    RunConfig(slt="D4-3-3", scenario="class-blocks", class_units="seen").validate()
