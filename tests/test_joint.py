"""Joint training (masq.consolidation.joint): phase t trains on the union of tasks 1..t, with
each sample's own output units in the task-incremental scenario; one run id whatever the
measure and λ; the label "joint"; the protocol end to end in the three scenarios."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from torch import nn

from masq import protocol as pr
from masq.config import RunConfig
from masq.consolidation import PhasePlan, canonical, check_config, get_method, method_label
from masq.consolidation.joint import union_of
from masq.errors import ConfigError
from masq.models import mlp
from masq.runid import run_id
from masq.scenarios import head_bias
from masq.training import TrainConfig
from masq.training.loop import train_task, unit_bias_rows

run_module = importlib.import_module("masq.protocol.run")

JOINT = RunConfig(slt="D5-5", hidden=(32,), iters1=60, iters2=60, eval_every=30,
                  batch_size=20, lr1=3e-3, lr2=3e-3, consolidation="joint")  # fmt: skip


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The training data and keywords of every train_task call of the protocol."""
    seen: list[dict[str, Any]] = []
    real = run_module.train_task

    def spy(model: nn.Module, train: Any, config: Any, **kwargs: Any) -> Any:
        seen.append({"train": train, **kwargs})
        return real(model, train, config, **kwargs)

    monkeypatch.setattr(run_module, "train_task", spy)
    return seen


def test_joint_keeps_task_one_where_fine_tuning_forgets_it(data_learnable: None) -> None:
    joint = pr.run(JOINT)
    tuned = pr.run(JOINT.with_(consolidation="ewc", importance="none", lam=0.0))
    assert joint.accuracy[0][0] == tuned.accuracy[0][0] > 0.9  # phase 1 is everyone's
    assert tuned.accuracy[1][0] < 0.1  # class-incremental fine-tuning forgets task 1
    assert joint.accuracy[1][0] > 0.6  # joint trained on it again


def test_the_union_is_what_phase_t_trains_on(
    data_learnable: None, calls: list[dict[str, Any]]
) -> None:
    config = JOINT.with_(slt="D4-3-3", iters1=5, iters2=5)
    tasks = pr.make_tasks(config)
    pr.run(config, tasks=tasks)
    assert len(calls) == 3
    for phase, call in enumerate(calls):
        x, y = call["train"]
        want_x = torch.cat([t.train[0] for t in tasks[: phase + 1]])
        want_y = torch.cat([t.train[1] for t in tasks[: phase + 1]])
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
        assert call["penalty_grad"] is None and call["grad_hook"] is None
        assert call["sample_units"] is None  # class scenario: one head, no masks


def test_union_of_names_each_samples_task(data_learnable: None) -> None:
    built = pr.make_tasks(RunConfig(slt="D4-3-3"))
    (x, y), index = union_of(built, 1)
    sizes = [t.train[0].shape[0] for t in built[:2]]
    assert x.shape[0] == y.shape[0] == index.shape[0] == sum(sizes)
    assert index.dtype == torch.int64
    assert index.tolist() == [0] * sizes[0] + [1] * sizes[1]
    with pytest.raises(ConfigError, match="no task 4"):
        union_of(built, 3)


def test_one_run_id_whatever_the_measure_and_lambda() -> None:
    a = RunConfig(slt="D4-3-3", consolidation="joint", importance="si", lam=3.0, si_damping=0.5)
    b = RunConfig(slt="D4-3-3", consolidation="joint", importance="fisher", lam=0.0, gamma=0.5)
    ca, cb = canonical(check_config(a)), canonical(check_config(b))
    assert ca == cb and ca.importance == "none" and ca.consolidation == "joint"
    assert run_id(ca) == run_id(cb)
    assert run_id(ca) != run_id(canonical(RunConfig(slt="D4-3-3", importance="none", lam=0.0)))
    assert method_label(a) == method_label(b) == "joint"
    method = get_method("joint")
    assert method.family == "joint" and not method.stackable and method.fields == ()
    assert not any(method.wants_importance(a, t) for t in range(3))


def test_per_sample_unit_masks() -> None:
    rows = unit_bias_rows([(0, 1), (2, 3), (1, 2)], 5)
    assert rows.shape == (3, 5) and rows.dtype == torch.float32
    for s, units in enumerate([(0, 1), (2, 3), (1, 2)]):
        assert torch.equal(rows[s], head_bias(units, 5))
    inf = float("-inf")
    assert rows[torch.tensor([1, 0, 1])].tolist() == [
        [inf, inf, 0.0, 0.0, inf],
        [0.0, 0.0, inf, inf, inf],
        [inf, inf, 0.0, 0.0, inf],
    ]
    with pytest.raises(ConfigError, match="non-empty subset"):
        unit_bias_rows([(0, 1), (7,)], 5)
    with pytest.raises(ConfigError, match="unit_sets is empty"):
        unit_bias_rows([], 5)


def small_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], TrainConfig]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 2, (40,), generator=g) * 2  # labels 0 and 2
    return (
        mlp((7,), in_features=6, classes=4, seed=2),
        (x, y),
        TrainConfig(lr=1e-2, iters=9, batch_size=8),
    )


def test_one_task_per_sample_is_bit_identical_to_its_units() -> None:
    model, train, config = small_problem()
    twin = mlp((7,), in_features=6, classes=4, seed=2)
    train_task(model, train, config, units=(0, 2))
    train_task(twin, train, config, sample_units=torch.zeros(40, dtype=torch.int64),
               unit_sets=[(0, 2)])  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(),
                                                 strict=True))  # fmt: skip


def test_each_sample_is_masked_by_its_own_units() -> None:
    """Samples of set 1 see only units (2, 3): the head rows 0 and 1 get gradient only from
    set 0's samples, so with every sample in set 1 they never move."""
    model, (x, y), config = small_problem()
    head = model[-1].weight.detach().clone()
    y = torch.where(y == 0, torch.full_like(y, 3), y)  # labels 2 and 3
    train_task(model, (x, y), config, sample_units=torch.ones(40, dtype=torch.int64),
               unit_sets=[(0, 1), (2, 3)])  # fmt: skip
    moved = (model[-1].weight.detach() - head).abs().sum(dim=1)
    assert float(moved[0]) == float(moved[1]) == 0.0 and float(moved[2]) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_units": torch.zeros(40, dtype=torch.int64)}, "together"),
        ({"unit_sets": [(0, 2)]}, "together"),
        (
            {
                "sample_units": torch.zeros(40, dtype=torch.int64),
                "unit_sets": [(0, 2)],
                "units": (0, 2),
            },
            "not both",
        ),
        ({"sample_units": torch.zeros(39, dtype=torch.int64), "unit_sets": [(0, 2)]}, "int64"),
        ({"sample_units": torch.zeros(40), "unit_sets": [(0, 2)]}, "int64"),
        ({"sample_units": torch.ones(40, dtype=torch.int64), "unit_sets": [(0, 2)]}, "index"),
    ],
)
def test_bad_sample_units_are_one_line_errors(kwargs: dict[str, Any], match: str) -> None:
    model, train, config = small_problem()
    with pytest.raises(ConfigError, match=match) as info:
        train_task(model, train, config, **kwargs)
    assert "\n" not in str(info.value)


def test_a_plan_with_data_needs_each_samples_task_when_tasks_have_units(
    data_learnable: None,
) -> None:
    tasks = pr.make_tasks(RunConfig(slt="D4-3-3", scenario="task"))
    plan = PhasePlan(train=tasks[1].train)
    with pytest.raises(ConfigError, match="train_tasks"):
        run_module.phase_units(tasks, 1, plan)
    units, sample, sets = run_module.phase_units(tasks, 1, PhasePlan())
    assert units == tasks[1].units and sample is None and sets is None


@pytest.mark.parametrize("scenario", ["class", "domain", "task"])
def test_joint_runs_in_every_scenario(
    data_learnable: None, calls: list[dict[str, Any]], scenario: str
) -> None:
    config = JOINT.with_(slt="D4-3-3", iters1=20, iters2=20, eval_every=10, scenario=scenario)
    tasks = pr.make_tasks(config)
    result = pr.run(config, tasks=tasks)
    assert len(result.accuracy) == 3
    assert all(0.0 <= v <= 1.0 for row in result.accuracy for v in row)
    assert result.importance_summary == {}
    assert result.timings["importance"] == []
    last = calls[-1]
    assert last["train"][0].shape[0] == sum(t.train[0].shape[0] for t in tasks)
    if scenario == "task":
        assert last["units"] is None
        assert last["unit_sets"] == tuple(tuple(t.units) for t in tasks)
        assert last["sample_units"].tolist() == union_of(tasks, 2)[1].tolist()
    else:
        assert last["units"] is None and last["sample_units"] is None
