"""Stacked T-task runs: K runs of five tasks trained at once equal K runs one by one (every
diagonal measure, EWC and online EWC, the three scenarios), and the identity that collapses
EWC's anchors into one per run (masq.consolidation.penalty.merged_anchor)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masq import protocol
from masq.config import RunConfig
from masq.consolidation import QuadraticPenalty, ewc, merged_anchor
from masq.errors import ConfigError
from masq.grid.plan import one_by_one, placement
from masq.models import mlp

FIVE = {"slt": "D2-2-2-2-2", "hidden": (16,), "iters1": 40, "iters2": 30, "batch_size": 20,
        "eval_every": 15, "lr1": 1e-3, "lr2": 1e-3, "masq_batch": 50, "fisher_samples": 60,
        "eval_val": True}  # fmt: skip


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _configs(base: RunConfig) -> list[RunConfig]:
    """A stack that mixes methods, measures, rates and λ (and a run without a penalty)."""
    return [
        base.with_(importance="none", lam=0.0),
        base.with_(importance="fisher", fisher_labels="exact", lam=300.0),
        base.with_(importance="fisher", fisher_labels="empirical", lam=30.0, lr2=3e-3),
        base.with_(importance="masq", scale="sum", lam=3.0),
        base.with_(importance="masq", lam=1e3, consolidation="online-ewc", gamma=0.7),
        base.with_(importance="mas", lam=10.0),
        base.with_(importance="l2", lam=0.1, consolidation="online-ewc", gamma=1.0),
    ]


@pytest.mark.parametrize(
    ("scenario", "adam_state", "class_units"),
    [
        ("class", "reset", "all"),
        ("task", "reset", "all"),
        ("domain", "reset", "all"),
        ("task", "keep", "all"),
        ("class", "keep", "seen"),
    ],
)
def test_five_task_stack_equals_runs_one_by_one(
    data_learnable: None, scenario: str, adam_state: str, class_units: str
) -> None:
    """Also with adam_state keep: each run's Adam state (moments, step count) goes from the
    task-1 state through the stack's phases as it goes through the phases of its own run;
    and with class_units seen, each phase's units those of the classes seen so far."""
    base = RunConfig(**FIVE, scenario=scenario, adam_state=adam_state, class_units=class_units)
    configs = _configs(base)
    tasks = protocol.make_tasks(base)
    d1 = protocol.train_first(base, tasks)
    imps = [protocol.compute_importance(c, d1, tasks) for c in configs]
    stacked = protocol.continue_stacked(
        configs, d1, [i for i, _ in imps], tasks, [s for _, s in imps], keep_weights=True
    )
    for config, (imp, seconds), rec in zip(configs, imps, stacked, strict=True):
        ref = protocol.continue_run(config, d1, imp, tasks, seconds, keep_weights=True)
        assert rec.config == ref.config and "diverged" not in rec.meta
        assert len(rec.curves) == len(ref.curves) == 5
        assert rec.weights is not None and ref.weights is not None
        for phase in range(1, 5):  # the state at the end of every phase
            for key, value in ref.weights[phase].items():
                torch.testing.assert_close(
                    rec.weights[phase][key], value, rtol=1e-4, atol=2e-5, msg=f"{key} {phase}"
                )
            for name, values in ref.curves[phase].items():
                assert rec.curves[phase][name] == pytest.approx(values, abs=0.011), name
        assert len(rec.timings["importance"]) == len(ref.timings["importance"])
        assert len(rec.timings["train"]) == 5 and rec.meta["stack"] == len(configs)
        assert rec.metrics.keys() == ref.metrics.keys()
    # the penalties act: the consolidated runs end elsewhere than fine-tuning
    w = "0.weight"
    finals = [r.weights[-1][w] for r in stacked if r.weights is not None]
    assert all(not torch.allclose(finals[0], f, atol=1e-4) for f in finals[1:])


def test_a_stack_diverging_in_a_later_phase_says_so_and_keeps_the_rest(
    data_learnable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    base = RunConfig(**{**FIVE, "hidden": (8,)}, importance="fisher", lam=10.0)
    configs = [base, base.with_(lr2=1e30)]  # Adam at lr 1e30 leaves the weights non-finite
    tasks = protocol.make_tasks(base)
    d1 = protocol.train_first(base, tasks)
    imps = [protocol.compute_importance(c, d1, tasks)[0] for c in configs]
    good, bad = protocol.continue_stacked(configs, d1, imps, tasks)
    assert "diverged" not in good.meta and bad.meta["diverged"] == "phase 2"
    err = capsys.readouterr().err
    assert err.count("not finite at the end of phase") == 1 and "lr2 1e+30" in err
    ref = protocol.continue_run(configs[0], d1, imps[0], tasks, keep_weights=False)
    assert good.last == pytest.approx(ref.last, abs=0.011)


def test_grids_stack_t_task_runs_of_diagonal_measures_only() -> None:
    base = RunConfig(**FIVE, importance="fisher", lam=10.0)
    assert placement(base, 16) == ("stack", (5, base.iters2))
    assert placement(base.with_(consolidation="online-ewc"), 16)[0] == "stack"
    assert placement(base.with_(importance="kfac"), 16)[0] == "single"
    assert placement(base.with_(importance="si"), 16)[0] == "alone"
    assert placement(base, 1) == ("single", "--stack 1")
    assert one_by_one([base, base.with_(lam=3.0)]) == {}
    kfac = protocol.stackable(base.with_(importance="kfac"))
    assert kfac is not None and "structured" in kfac
    si = protocol.stackable(base.with_(importance="si"))
    assert si is not None and "accumulates during training" in si


def _random_anchor(shape: tuple[int, ...], seed: int, zero: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f = torch.rand(shape, generator=gen, dtype=torch.float64)
    f[torch.rand(shape, generator=gen) < zero] = 0.0
    return {"w": f}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 10_000), zero=st.sampled_from([0.0, 0.5]))
def test_merged_anchor_has_the_gradient_of_the_sum(n: int, seed: int, zero: float) -> None:
    """Σ_a F^a (θ − θ^a) = F̄ (θ − θ̄) for every θ (float64), also where some F^a are 0."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [
        ({"w": torch.randn(3, 4, generator=gen, dtype=torch.float64)},
         _random_anchor((3, 4), seed + a, zero))
        for a in range(n)
    ]  # fmt: skip
    params, total = merged_anchor(pairs)
    theta = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    summed = sum(f["w"] * (theta - p["w"]) for p, f in pairs)
    torch.testing.assert_close(total["w"] * (theta - params["w"]), summed)
    torch.testing.assert_close(total["w"], sum(f["w"] for _, f in pairs))
    assert bool(torch.isfinite(params["w"]).all())


def test_merged_anchor_keeps_one_anchor_exactly_and_refuses_none() -> None:
    net = mlp((5,), in_features=4, classes=3, seed=0)
    imp = {k: torch.rand_like(p) for k, p in net.named_parameters()}
    one = ewc.anchor(net, imp)
    params, total = merged_anchor([(one.params, one.importance)])
    assert all(torch.equal(params[k], one.params[k]) for k in params)
    assert all(torch.equal(total[k], one.importance[k]) for k in total)
    with pytest.raises(ConfigError, match="no anchors"):
        merged_anchor([])


def test_a_merged_penalty_has_the_gradient_of_the_penalty() -> None:
    """QuadraticPenalty.merged(): λ F̄ (θ − θ̄) equals add_grad of two anchors (float32)."""
    net = mlp((6,), in_features=4, classes=3, seed=1)
    first = ewc.anchor(net, {k: torch.rand_like(p) for k, p in net.named_parameters()})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    second = ewc.anchor(net, {k: torch.rand_like(p) for k, p in net.named_parameters()})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    penalty = QuadraticPenalty(net, [first, second], 7.0)
    penalty(net)
    lam, params, total = penalty.merged()
    assert lam == 7.0
    for key, p in net.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(lam * total[key] * (p.detach() - params[key]), p.grad)


def test_stacked_adam_states_round_trip_and_refuse_mixed_step_counts() -> None:
    from masq.stacked import stack_state
    from masq.stacked.adam import StackedAdam
    from masq.training import AdamMoments

    state = mlp((6,), in_features=10, classes=3, seed=1).state_dict()
    model = stack_state(state, 2)
    g = torch.Generator().manual_seed(0)
    moments = [
        AdamMoments(
            7,
            {k: torch.randn(v.shape, generator=g) for k, v in state.items()},
            {k: torch.rand(v.shape, generator=g) for k, v in state.items()},
        )
        for _ in range(2)
    ]
    adam = StackedAdam.create(model, [1e-3, 1e-3], fused=False)
    adam.load(model, moments)
    assert adam.t == 7
    for run in range(2):
        back = adam.moments(model, run)
        assert back.step == 7
        for key in state:
            assert torch.equal(back.exp_avg[key], moments[run].exp_avg[key])
            assert torch.equal(back.exp_avg_sq[key], moments[run].exp_avg_sq[key])
    mixed = [moments[0], AdamMoments(8, moments[1].exp_avg, moments[1].exp_avg_sq)]
    with pytest.raises(ConfigError, match="one step count"):
        StackedAdam.create(model, [1e-3, 1e-3]).load(model, mixed)
    other = stack_state(mlp((5,), in_features=10, classes=3, seed=1).state_dict(), 2)
    with pytest.raises(ConfigError, match=r"shape|architecture|size"):
        StackedAdam.create(other, [1e-3, 1e-3]).load(other, moments)
