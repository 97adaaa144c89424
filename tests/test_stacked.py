"""masq.stacked: K stacked runs equal K separate runs (Adam, penalty, batches, evaluation)."""

from __future__ import annotations

import pytest
import torch

from masq import ewc, experiment, stacked, train
from masq import tasks as masq_tasks
from masq.errors import ConfigError
from masq.experiment import ExperimentConfig, stream_seed
from masq.models import mlp
from tests.synthetic import synthetic_dataset


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _states(hidden: tuple[int, ...], k: int) -> list[dict[str, torch.Tensor]]:
    return [dict(mlp(hidden, in_features=12, classes=5, seed=s).state_dict()) for s in range(k)]


def test_stack_and_unstack_round_trip() -> None:
    states = _states((7, 5), 3)
    model = stacked.stack_states(states)
    assert model.params[0].shape == (3, 12, 7) and model.params[2].shape == (3, 7, 5)
    for run, state in enumerate(states):
        back = stacked.unstack(model, run)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_forward_equals_each_model() -> None:
    hidden = (7, 6, 5)
    states = _states(hidden, 4)
    model = stacked.stack_states(states)
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(0))
    logits = stacked.forward(model, x)
    for run, state in enumerate(states):
        net = mlp(hidden, in_features=12, classes=5)
        net.load_state_dict(state)
        torch.testing.assert_close(logits[run], net(x), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("fused", [False, True])
def test_stacked_adam_equals_torch_adam_per_run(fused: bool) -> None:
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


@pytest.fixture(scope="module")
def d1_setup() -> tuple[ExperimentConfig, list, experiment.D1State]:
    torch.set_num_threads(1)
    data = synthetic_dataset(400, 60, 120)
    base = ExperimentConfig(
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
    return base, tasks, experiment.train_d1(base, tasks)


def _separate(
    config: ExperimentConfig, d1: experiment.D1State, imp: dict, tasks: list
) -> tuple[dict, dict]:
    """The reference: one train_task call as experiment.retrain_d2 makes it (weights kept)."""
    model = experiment.build_model(config, tasks)
    model.load_state_dict(d1.state_dict)
    penalty = None
    if config.importance != "none" and config.lam > 0:
        anchor = ewc.anchor(model, imp)

        def penalty(m: torch.nn.Module) -> torch.Tensor:
            return ewc.penalty(m, anchor, config.lam)

    sets, unions = experiment.eval_sets(config, tasks)
    cfg = train.TrainConfig(
        lr=config.lr2,
        iters=config.iters2,
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        seed=stream_seed(config.seed, "d2-batches"),
    )
    curve = train.train_task(
        model, tasks[1].train, cfg, penalty=penalty, eval_sets=sets, unions=unions
    )
    return curve, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _configs(base: ExperimentConfig) -> list[ExperimentConfig]:
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
    imps = [experiment.compute_importance(c, d1, tasks)[0] for c in configs]
    sets, unions = experiment.eval_sets(base, tasks)
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


def test_retrain_d2_stacked_records_equal_retrain_d2(d1_setup: tuple) -> None:
    base, tasks, d1 = d1_setup
    configs = _configs(base)
    imps = [experiment.compute_importance(c, d1, tasks) for c in configs]
    records = stacked.retrain_d2_stacked(
        configs, d1, [i for i, _ in imps], tasks, [s for _, s in imps]
    )
    for config, (imp, seconds), rec in zip(configs, imps, records, strict=True):
        ref = experiment.retrain_d2(config, d1, imp, tasks, seconds)
        assert rec.config == ref.config and rec.curve_d1 == ref.curve_d1
        assert rec.curve_d2.keys() == ref.curve_d2.keys()
        for name, values in ref.curve_d2.items():
            assert rec.curve_d2[name] == pytest.approx(values, abs=0.021)
        assert rec.best.keys() == ref.best.keys() and rec.last.keys() == ref.last.keys()
        assert rec.last["D1∪D2"] == pytest.approx(ref.last["D1∪D2"], abs=0.01)
        assert rec.importance_summary == ref.importance_summary
        assert rec.timings.keys() == ref.timings.keys()
        assert rec.timings["importance"] == seconds and rec.meta["stack"] == len(configs)
        assert experiment.Result.from_json(rec.to_json()).config == config


def test_one_run_stack_and_errors(d1_setup: tuple) -> None:
    base, tasks, d1 = d1_setup
    config = base.with_(lam=100.0, importance="masq", lr2=1e-2)
    imp, _ = experiment.compute_importance(config, d1, tasks)
    (rec,) = stacked.retrain_d2_stacked([config], d1, [imp], tasks)
    ref = experiment.retrain_d2(config, d1, imp, tasks)
    assert rec.curve_d2["D1∪D2"] == pytest.approx(ref.curve_d2["D1∪D2"], abs=0.021)
    with pytest.raises(ConfigError, match="importance keys"):
        stacked.retrain_d2_stacked([config], d1, [{"0.weight": imp["0.weight"]}], tasks)
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
    with pytest.raises(ConfigError, match="differs from the D1 state"):
        stacked.retrain_d2_stacked([config.with_(hidden=(8,))], d1, [imp], tasks)
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
