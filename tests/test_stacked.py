"""masq.stacked and masq.protocol.continue_stacked: K stacked runs equal K separate runs
(Adam, penalty, batches, evaluation, records)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from masq import protocol, scenarios, stacked, training
from masq import tasks as masq_tasks
from masq.config import RunConfig
from masq.consolidation import ewc
from masq.errors import ConfigError
from masq.models import mlp
from masq.protocol import D1State, Result, stream_seed
from masq.stacked.model import stored_layout
from tests.synthetic import learnable_dataset, synthetic_dataset

GOLDEN = Path(__file__).parent / "data" / "golden_t2_v1.json"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _states(hidden: tuple[int, ...], k: int) -> list[dict[str, torch.Tensor]]:
    return [dict(mlp(hidden, in_features=12, classes=5, seed=s).state_dict()) for s in range(k)]


def test_stored_layout_transposes_weights_only() -> None:
    w = torch.arange(6.0).reshape(2, 3)  # [out, in]
    b = torch.arange(2.0)
    assert stored_layout(w).shape == (3, 2)
    assert stored_layout(w)[2, 1] == w[1, 2] == 5.0
    assert stored_layout(b) is b


def test_stack_and_unstack_round_trip() -> None:
    states = _states((7, 5), 3)
    model = stacked.stack_states(states)
    assert model.k == 3 and model.layers == 3
    assert model.params[0].shape == (3, 12, 7) and model.params[2].shape == (3, 7, 5)
    assert model.keys == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    for run, state in enumerate(states):
        back = stacked.unstack(model, run)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConfigError, match="unexpected parameter"):
        stacked.stack_states([{"weight": torch.zeros(2, 2)}])


def test_forward_equals_each_model() -> None:
    hidden = (7, 6, 5)
    states = _states(hidden, 4)
    model = stacked.stack_states(states)
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(0))
    logits = stacked.forward(model, x)
    y = torch.arange(9) % 5
    correct = stacked.stacked_correct(model, x, y)
    for run, state in enumerate(states):
        net = mlp(hidden, in_features=12, classes=5)
        net.load_state_dict(state)
        ref = net(x)
        torch.testing.assert_close(logits[run], ref, rtol=1e-5, atol=1e-6)
        assert int(correct[run]) == int((ref.argmax(dim=1) == y).sum())


def test_gradients_equal_separate_autograd() -> None:
    hidden = (7, 5)
    states = _states(hidden, 3)
    model = stacked.stack_states(states)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 12, generator=gen), torch.randint(0, 5, (10,), generator=gen)
    for p in model.params:
        p.requires_grad_(True)
    auto = torch.autograd.grad(stacked.task_losses(model, x, y), model.params)
    for p in model.params:
        p.requires_grad_(False)
    grads = stacked.loss_grads(model, stacked.Workspace.create(model, 10), x, y)
    for a, g in zip(auto, grads, strict=True):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-7)
    grad_model = stacked.StackedMLP(3, [g.clone() for g in grads], model.keys)
    for run, state in enumerate(states):
        net = mlp(hidden, in_features=12, classes=5).double()
        net.load_state_dict({k: v.double() for k, v in state.items()})
        torch.nn.functional.cross_entropy(net(x.double()), y).backward()
        ref = {k: p.grad for k, p in net.named_parameters()}
        got = stacked.unstack(grad_model, run)
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-4, atol=1e-6)


def test_masked_gradients_equal_autograd_and_vanish_on_masked_units() -> None:
    """loss_grads(bias = head_bias(U)) == autograd of CE(f(x) + bias, y) per run (float64
    reference), δ exactly 0 on the units outside U; stacked_correct argmaxes over U only."""
    hidden = (7, 5)
    states = _states(hidden, 3)
    model = stacked.stack_states(states)
    gen = torch.Generator().manual_seed(4)
    units = (1, 3)
    x = torch.randn(11, 12, generator=gen)
    y = torch.tensor(units)[torch.randint(0, 2, (11,), generator=gen)]
    bias = scenarios.head_bias(units, 5)
    assert bias is not None
    grads = stacked.loss_grads(model, stacked.Workspace.create(model, 11), x, y, bias)
    grad_model = stacked.StackedMLP(3, [g.clone() for g in grads], model.keys)
    others = [0, 2, 4]
    assert grads[-1][:, others].eq(0).all() and grads[-2][:, :, others].eq(0).all()
    correct = stacked.stacked_correct(model, x, y, bias=bias)
    for run, state in enumerate(states):
        net = mlp(hidden, in_features=12, classes=5).double()
        net.load_state_dict({k: v.double() for k, v in state.items()})
        logits = net(x.double())
        F.cross_entropy(logits + bias.double(), y).backward()
        got = stacked.unstack(grad_model, run)
        for k, p in net.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(got[k].double(), p.grad, rtol=1e-4, atol=1e-6)
        kept = torch.tensor(units)
        assert int(correct[run]) == int((kept[logits[:, kept].argmax(1)] == y).sum())


@pytest.mark.parametrize("fused", [False, True])
def test_stacked_adam_equals_torch_adam_per_run(fused: bool) -> None:
    if fused and not training.fused_adam_available(torch.device("cpu")):
        pytest.skip("this torch has no fused Adam on the CPU")
    hidden = (6, 4)
    lrs = [1e-2, 1e-3, 3e-4]
    states = _states(hidden, 3)
    model = stacked.stack_states(states)
    opt = stacked.StackedAdam.create(model, lrs, fused=fused)
    nets = []
    for state, lr in zip(states, lrs, strict=True):
        net = mlp(hidden, in_features=12, classes=5)
        net.load_state_dict(state)
        nets.append((net, torch.optim.Adam(net.parameters(), lr=lr, fused=fused)))
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        per_run = [
            {k: torch.randn(p.shape, generator=gen) for k, p in net.named_parameters()}
            for net, _ in nets
        ]
        grads = stacked.stack_states(per_run).params
        opt.step(model.params, grads)
        for (net, adam), g in zip(nets, per_run, strict=True):
            for k, p in net.named_parameters():
                p.grad = g[k].clone()
            adam.step()
    for run, (net, _) in enumerate(nets):
        got = stacked.unstack(model, run)
        for k, p in net.named_parameters():
            torch.testing.assert_close(got[k], p.detach(), rtol=1e-6, atol=1e-7)


def test_stacked_adam_adds_the_ewc_gradient_only_where_penalized() -> None:
    """step(lam_f, anchors, penalized) == Adam on g + λF(θ − θ*) for the flagged runs only."""
    hidden = (5,)
    states = _states(hidden, 2)
    model = stacked.stack_states(states)
    anchor_state = _states(hidden, 3)[2]
    anchors = stacked.stack_states([anchor_state]).params  # leading dimension 1
    gen = torch.Generator().manual_seed(3)
    lam_f = [torch.rand(p.shape, generator=gen) for p in model.params]
    grads = [torch.randn(p.shape, generator=gen) for p in model.params]
    expected = []
    for run in range(2):
        net = mlp(hidden, in_features=12, classes=5)
        net.load_state_dict(states[run])
        adam = torch.optim.Adam(net.parameters(), lr=1e-2)
        for i, (k, p) in enumerate(net.named_parameters()):
            g = stored_layout(grads[i][run]).clone()
            if run == 1:  # the penalized run
                g += stored_layout(lam_f[i][run]) * (p.detach() - anchor_state[k])
            p.grad = g
        adam.step()
        expected.append({k: p.detach().clone() for k, p in net.named_parameters()})
    opt = stacked.StackedAdam.create(model, [1e-2, 1e-2], fused=False)
    opt.step(model.params, [g.clone() for g in grads], lam_f, anchors, [False, True])
    for run in range(2):
        got = stacked.unstack(model, run)
        for k, ref in expected[run].items():
            torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def d1_setup() -> Iterator[tuple[RunConfig, list[masq_tasks.Task], D1State]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    data = synthetic_dataset(400, 60, 120)
    base = RunConfig(
        slt="D5-5",
        hidden=(16, 12),
        iters1=40,
        iters2=45,
        eval_every=10,
        batch_size=25,
        masq_batch=50,
        eval_val=True,
    )
    tasks = masq_tasks.make(base.slt, dataset=data, seed=stream_seed(0, "tasks"))
    try:
        yield base, tasks, protocol.train_first(base, tasks)
    finally:
        torch.set_num_threads(before)


def _separate(
    config: RunConfig, d1: D1State, imp: dict[str, torch.Tensor], tasks: list[masq_tasks.Task]
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """The reference: one train_task call with the EWC penalty written out (weights kept)."""
    model = protocol.build_model(config, tasks)
    model.load_state_dict(d1.state_dict)
    penalty = None
    if config.importance != "none" and config.lam > 0:
        anchor = ewc.anchor(model, imp)

        def penalty(m: torch.nn.Module) -> torch.Tensor:
            return ewc.penalty(m, anchor, config.lam)

    sets, unions = protocol.eval_sets(config, tasks, 1)
    cfg = training.TrainConfig(
        lr=config.lr2,
        iters=config.iters2,
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        seed=stream_seed(config.seed, "d2-batches"),
    )
    curve = training.train_task(
        model, tasks[1].train, cfg, penalty=penalty, eval_sets=sets, unions=unions
    )
    return curve, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _configs(base: RunConfig) -> list[RunConfig]:
    return [
        base.with_(lr2=1e-2, lam=0.0, importance="none"),
        base.with_(lr2=1e-2, lam=50.0, importance="masq"),
        base.with_(lr2=1e-3, lam=5000.0, importance="masq"),
        base.with_(lr2=3e-3, lam=200.0, importance="fisher"),
        base.with_(lr2=1e-2, lam=1e4, importance="masq", scale="sum"),
    ]


def test_stacked_training_equals_separate_runs(d1_setup: tuple) -> None:
    base, tasks, d1 = d1_setup
    configs = _configs(base)
    imps = [protocol.compute_importance(c, d1, tasks)[0] for c in configs]
    sets, unions = protocol.eval_sets(base, tasks, 1)
    curves, states = stacked.train_stacked(
        d1.state_dict,
        tasks[1].train,
        lrs=[c.lr2 for c in configs],
        lams=[c.lam for c in configs],
        importances=imps,
        iters=base.iters2,
        batch_size=base.batch_size,
        eval_every=base.eval_every,
        seed=stream_seed(base.seed, "d2-batches"),
        eval_sets=sets,
        unions=unions,
    )
    finals = []
    for config, imp, curve, state in zip(configs, imps, curves, states, strict=True):
        ref_curve, ref_state = _separate(config, d1, imp, tasks)
        assert curve.keys() == ref_curve.keys()
        assert curve["iteration"] == ref_curve["iteration"] == [0, 10, 20, 30, 40, 45]
        for name, values in ref_curve.items():
            n = (
                sum(int(sets[m][1].shape[0]) for m in unions.get(name, (name,)))
                if (name != "iteration")
                else 1
            )
            assert curve[name] == pytest.approx(values, abs=1.01 / n)  # within one sample
        for k in ref_state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5)
        finals.append(state)
    # the runs really differ (the penalty and the rates act)
    w = "0.weight"
    assert not torch.allclose(finals[0][w], finals[1][w], atol=1e-4)
    assert not torch.allclose(finals[1][w], finals[4][w], atol=1e-4)


def test_continue_stacked_records_equal_continue_run(d1_setup: tuple) -> None:
    base, tasks, d1 = d1_setup
    configs = _configs(base)
    imps = [protocol.compute_importance(c, d1, tasks) for c in configs]
    records = protocol.continue_stacked(
        configs, d1, [i for i, _ in imps], tasks, [s for _, s in imps], keep_weights=True
    )
    for config, (imp, seconds), rec in zip(configs, imps, records, strict=True):
        ref = protocol.continue_run(config, d1, imp, tasks, seconds, keep_weights=True)
        assert rec.config == ref.config and rec.curves[0] == ref.curves[0] == d1.curve
        assert len(rec.curves) == len(ref.curves) == 2
        assert rec.curves[1].keys() == ref.curves[1].keys()
        for name, values in ref.curves[1].items():
            assert rec.curves[1][name] == pytest.approx(values, abs=0.021)
        assert rec.best.keys() == ref.best.keys() and rec.last.keys() == ref.last.keys()
        assert rec.last["D1∪D2"] == pytest.approx(ref.last["D1∪D2"], abs=0.01)
        # R[i][j]: task j's test accuracy at the end of phase i, read off the curves
        assert rec.accuracy == [[c["D1"][-1], c["D2"][-1]] for c in (rec.curves[0], rec.curves[1])]
        assert rec.accuracy[0] == ref.accuracy[0]
        assert rec.importance_summary == ref.importance_summary
        assert rec.timings["importance"] == [seconds]
        assert rec.timings["train"][0] == d1.seconds == ref.timings["train"][0]
        assert rec.meta["stack"] == len(configs) and "stack" not in ref.meta
        assert rec.weights is not None and ref.weights is not None and len(rec.weights) == 2
        for k in d1.state_dict:
            assert torch.equal(rec.weights[0][k], d1.state_dict[k])
            torch.testing.assert_close(rec.weights[1][k], ref.weights[1][k], rtol=1e-4, atol=1e-5)
        back = Result.from_json(rec.to_json())
        assert back.config == config and back.curves == rec.curves
    plain = protocol.continue_stacked(configs[:2], d1, [{}, imps[1][0]], tasks)
    assert [r.weights for r in plain] == [None, None]


def test_continue_stacked_reproduces_the_golden_records() -> None:
    """The stacked records of masq 0.1 (tests/data/golden_t2_v1.json, one stack of six on
    tests.synthetic.learnable_dataset()) come out of continue_stacked number for number."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))["stacked"]
    configs = [RunConfig.from_dict(e["result"]["config"]) for e in golden]
    tasks = masq_tasks.make(
        "D5-5", dataset=learnable_dataset(), seed=stream_seed(configs[0].seed, "tasks")
    )
    d1 = protocol.train_first(configs[0], tasks)
    imps = [protocol.compute_importance(c, d1, tasks)[0] for c in configs]
    records = protocol.continue_stacked(configs, d1, imps, tasks)
    for entry, rec in zip(golden, records, strict=True):
        old = entry["result"]
        assert rec.curves == [old["curve_d1"], old["curve_d2"]]
        assert rec.best == old["best"] and rec.last == old["last"]
        assert rec.importance_summary.keys() == old["importance_summary"].keys()
        for name, stats in old["importance_summary"].items():
            assert rec.importance_summary[name] == pytest.approx(stats, rel=1e-5)
    # the curves move: the golden check is not one of constants
    assert len({r.last["D1∪D2"] for r in records} | {records[0].best["D1∪D2"]}) > 1


def test_one_run_stack_and_errors(d1_setup: tuple) -> None:
    base, tasks, d1 = d1_setup
    config = base.with_(lam=100.0, importance="masq", lr2=1e-2)
    imp, _ = protocol.compute_importance(config, d1, tasks)
    (rec,) = protocol.continue_stacked([config], d1, [imp], tasks)
    ref = protocol.continue_run(config, d1, imp, tasks, keep_weights=False)
    assert rec.curves[1]["D1∪D2"] == pytest.approx(ref.curves[1]["D1∪D2"], abs=0.021)
    assert protocol.continue_stacked([], d1, [], tasks) == []
    with pytest.raises(ConfigError, match="importance keys"):
        protocol.continue_stacked([config], d1, [{"0.weight": imp["0.weight"]}], tasks)
    bad = {k: v[..., :1] for k, v in imp.items()}
    with pytest.raises(ConfigError, match="shape"):
        stacked.train_stacked(
            d1.state_dict,
            tasks[1].train,
            lrs=[1e-3],
            lams=[1.0],
            importances=[bad],
            iters=2,
            batch_size=10,
            eval_every=1,
            seed=0,
        )
    with pytest.raises(ConfigError, match="differs from the task-1 state"):
        protocol.continue_stacked([config.with_(hidden=(8,))], d1, [imp], tasks)
    with pytest.raises(ConfigError, match="same iters2"):
        protocol.continue_stacked([config, config.with_(iters2=7)], d1, [imp, imp], tasks)
    three = config.with_(slt="D3-3-4")
    d1_three = D1State(three, d1.state_dict, d1.curve, d1.seconds)
    with pytest.raises(ConfigError, match="has 3 tasks but 2 were given"):
        protocol.continue_stacked([three], d1_three, [imp], tasks)
    with pytest.raises(ConfigError, match="one lr"):
        stacked.train_stacked(
            d1.state_dict,
            tasks[1].train,
            lrs=[1e-3],
            lams=[],
            importances=[],
            iters=2,
            batch_size=10,
            eval_every=1,
            seed=0,
        )


@pytest.mark.parametrize("slt", ["D5-5", "DP10-10"])
def test_stacked_with_units_equals_separate_masked_runs(slt: str) -> None:
    """Task-incremental heads (split: the task's classes of one 10-unit head; permuted: a
    block of 10 of 20 units): K stacked runs with units/eval_units equal K train_task calls
    with the same units/eval_units (penalty (λ/2) Σ F (θ − θ*)² written out)."""
    run_tasks = scenarios.apply_scenario(
        masq_tasks.make(slt, dataset=learnable_dataset(300, 60, 120), seed=0), "task"
    )
    n = scenarios.n_outputs(run_tasks)
    assert n == (10 if slt == "D5-5" else 20)
    start = mlp((16,), classes=n, seed=1)
    state = {k: v.detach().clone() for k, v in start.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    imp = {k: torch.rand(v.shape, generator=gen) for k, v in state.items()}
    lrs, lams, imps = [1e-2, 3e-3, 1e-2], [0.0, 0.0, 30.0], [{}, {}, imp]
    sets = {t.name: t.test for t in run_tasks}
    unions = {"D1∪D2": ("D1", "D2")}
    eval_units = {t.name: t.units for t in run_tasks if t.units is not None}
    units = run_tasks[1].units
    train, iters, batch, seed = run_tasks[1].train, 40, 20, 7
    curves, states = stacked.train_stacked(
        state,
        train,
        lrs=lrs,
        lams=lams,
        importances=imps,
        iters=iters,
        batch_size=batch,
        eval_every=10,
        seed=seed,
        eval_sets=sets,
        unions=unions,
        units=units,
        eval_units=eval_units,
    )
    for lr, lam, f, curve, got in zip(lrs, lams, imps, curves, states, strict=True):
        net = mlp((16,), classes=n)
        net.load_state_dict(state)

        def penalty(m: torch.nn.Module, lam: float = lam, f: dict = f) -> torch.Tensor:
            return sum(
                (lam / 2 * f[k] * (p - state[k]) ** 2).sum() for k, p in m.named_parameters()
            )

        config = training.TrainConfig(
            lr=lr, iters=iters, batch_size=batch, eval_every=10, seed=seed
        )
        ref = training.train_task(
            net,
            train,
            config,
            penalty=penalty if f else None,
            eval_sets=sets,
            unions=unions,
            units=units,
            eval_units=eval_units,
        )
        assert curve.keys() == ref.keys() and curve["iteration"] == ref["iteration"]
        for name, values in ref.items():
            total = (
                sum(int(sets[m][1].shape[0]) for m in unions.get(name, (name,)))
                if name != "iteration"
                else 1
            )
            assert curve[name] == pytest.approx(values, abs=1.01 / total), name
        for k, v in net.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
        # the other task's output units never move
        last = "2.weight"
        others = [u for u in range(n) if u not in set(units)]
        assert torch.equal(got[last][others], state[last][others])
    assert all(len(set(c["D2"])) > 2 for c in curves)  # the masked curves move
    assert not torch.allclose(states[0]["0.weight"], states[2]["0.weight"], atol=1e-4)
