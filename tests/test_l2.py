"""The L2 measure (masq.importance.l2): F = 1, so the consolidation penalty is
(λ/2) Σ (θ − θ*)², checked by hand, through the registry and through a 3-task run."""

from __future__ import annotations

import importlib

import pytest
import torch

from masq import data, importance
from masq import protocol as pr
from masq.config import RunConfig
from masq.consolidation import anchor, canonical, method_label, penalty
from masq.errors import ConfigError
from masq.importance.l2 import uniform
from masq.models import mlp
from tests.synthetic import learnable_dataset

run_module = importlib.import_module("masq.protocol.run")


def test_uniform_importance_is_ones_shaped_placed_and_typed_like_the_parameters() -> None:
    model = mlp((5,), in_features=4, classes=3, seed=0).double()
    model[0].bias.requires_grad_(False)
    imp = uniform(model)
    assert set(imp) == {"0.weight", "2.weight", "2.bias"}  # trainable only
    for name, f in imp.items():
        p = dict(model.named_parameters())[name]
        assert f.shape == p.shape and f.dtype == p.dtype and bool((f == 1).all())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        uniform(model)


def test_the_l2_penalty_is_half_lambda_times_the_squared_distance() -> None:
    model = mlp((6,), in_features=3, classes=2, seed=1)
    a = anchor(model, uniform(model))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1))
    by_hand = sum(0.5 * 7.0 * float(((p.detach() - a.params[k]) ** 2).sum())
                  for k, p in model.named_parameters())  # fmt: skip
    value = penalty(model, a, 7.0)
    assert float(value.detach()) == pytest.approx(by_hand, rel=1e-6)
    value.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 7.0 * (p.detach() - a.params[k]), rtol=1e-6, atol=0)


def test_l2_through_the_registry() -> None:
    measure = importance.get_measure("l2")
    assert measure.fields == () and not measure.reads_data and measure.standalone
    config = RunConfig(importance="l2", masq_batch=10, scale="sum", lam=5.0)
    assert canonical(config) == RunConfig(importance="l2", lam=5.0)  # nothing else matters
    assert method_label(config) == "L2"


def test_a_three_task_l2_run_pulls_towards_every_earlier_solution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Phase 3's penalty gradient is λ Σ_{s<3} (θ − θ^s), θ^s the weights after phase s."""
    dataset = learnable_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)
    grads: list[object] = []
    real = run_module.train_task

    def spy(model, train, config, **kwargs):  # type: ignore[no-untyped-def]
        grads.append(kwargs.get("penalty_grad"))
        return real(model, train, config, **kwargs)

    monkeypatch.setattr(run_module, "train_task", spy)
    config = RunConfig(slt="D4-3-3", hidden=(16,), iters1=20, iters2=20, batch_size=20,
                       eval_every=10, lr1=1e-3, lr2=1e-3, importance="l2", lam=3.0)  # fmt: skip
    result = pr.run(config)
    assert result.weights is not None and grads[0] is None
    w = result.weights
    net = mlp((16,), seed=0)
    net.load_state_dict(w[2])
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    grads[2](net)  # type: ignore[operator]
    for k, p in net.named_parameters():
        expected = 3.0 * ((w[2][k] - w[0][k]) + (w[2][k] - w[1][k]))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    assert result.importance_summary["0.weight"]["max"] == 1.0
