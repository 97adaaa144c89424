"""masq.consolidation.ewc: anchors, the EWC penalty and online EWC's running importance."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from masq.consolidation import ewc
from masq.errors import ConfigError
from masq.models import mlp
from masq.training import TrainConfig, train_task


def tiny(seed: int = 0) -> nn.Sequential:
    return mlp((3,), in_features=4, classes=2, seed=seed).double()


def importance_for(model: nn.Module, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g, dtype=torch.float64)
        for n, p in model.named_parameters()
    }


def shift(model: nn.Module, seed: int = 2, size: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_zero_at_the_anchor() -> None:
    model = tiny()
    a = ewc.anchor(model, importance_for(model))
    value = ewc.penalty(model, a, 1234.5)
    assert value.item() == 0.0
    value.backward()
    assert all(torch.all(p.grad == 0) for p in model.parameters())


def test_value_and_gradient_against_a_hand_computation() -> None:
    model = tiny()
    imp = importance_for(model)
    a = ewc.anchor(model, imp)
    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    shift(model)
    lam = 7.5
    by_hand = 0.0  # (lam / 2) sum_i sum_k F_ik (theta_ik - theta*_ik)^2, entry by entry
    for n, p in model.named_parameters():
        for f, t, s in zip(
            imp[n].flatten().tolist(),
            p.detach().flatten().tolist(),
            star[n].flatten().tolist(),
            strict=True,
        ):
            by_hand += 0.5 * lam * f * (t - s) ** 2
    value = ewc.penalty(model, a, lam)
    assert value.item() == pytest.approx(by_hand, rel=1e-12)
    value.backward()
    for n, p in model.named_parameters():
        expected = lam * imp[n] * (p.detach() - star[n])  # grad = lam F (theta - theta*)
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)


def test_anchor_is_a_frozen_copy() -> None:
    model = tiny()
    imp = importance_for(model)
    a = ewc.anchor(model, imp)
    before = {n: t.clone() for n, t in a.params.items()}
    shift(model)
    imp["0.weight"].mul_(10)
    for n, t in a.params.items():
        assert torch.equal(t, before[n]) and not t.requires_grad
    assert not torch.equal(a.importance["0.weight"], imp["0.weight"])
    with pytest.raises(TypeError):
        a.params["0.weight"] = torch.zeros(1)  # type: ignore[index]


def test_a_list_of_anchors_sums_their_terms() -> None:
    model = tiny()
    a1 = ewc.anchor(model, importance_for(model, 1))
    shift(model, seed=3)
    a2 = ewc.anchor(model, importance_for(model, 4))
    shift(model, seed=5)
    both = ewc.penalty(model, [a1, a2], 3.0)
    assert both.item() == pytest.approx(
        ewc.penalty(model, a1, 3.0).item() + ewc.penalty(model, a2, 3.0).item(), rel=1e-12
    )


def test_penalty_is_linear_in_lambda() -> None:
    model = tiny()
    a = ewc.anchor(model, importance_for(model))
    shift(model)
    assert ewc.penalty(model, a, 0.0).item() == 0.0
    assert ewc.penalty(model, a, 4.0).item() == pytest.approx(
        4 * ewc.penalty(model, a, 1.0).item(), rel=1e-12
    )


def test_negative_lambda_is_an_error() -> None:
    model = tiny()
    a = ewc.anchor(model, importance_for(model))
    with pytest.raises(ConfigError, match="lam"):
        ewc.penalty(model, a, -1.0)


def test_missing_keys_are_errors_never_a_zero_penalty() -> None:
    model = tiny()
    imp = importance_for(model)
    del imp["0.bias"]
    with pytest.raises(ConfigError, match=r"0\.bias"):
        ewc.anchor(model, imp)
    with pytest.raises(ConfigError, match="importance"):
        ewc.anchor(model, {})
    other = mlp((3, 3), in_features=4, classes=2).double()
    a = ewc.anchor(other, importance_for(other))
    with pytest.raises(ConfigError, match="anchor keys"):
        ewc.penalty(model, a, 1.0)
    with pytest.raises(ConfigError, match="no anchors"):
        ewc.penalty(model, [], 1.0)


def test_shape_mismatch_is_an_error() -> None:
    model = tiny()
    imp = importance_for(model)
    imp["0.weight"] = imp["0.weight"].T
    with pytest.raises(ConfigError, match="shape"):
        ewc.Anchor({n: p.detach() for n, p in model.named_parameters()}, imp)


def test_lambda_zero_is_bitwise_plain_training() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, 784, generator=g), torch.randint(0, 10, (200,), generator=g)
    config = TrainConfig(lr=1e-2, iters=30, batch_size=16, seed=3)

    plain = mlp((12,), seed=1)
    train_task(plain, (x, y), config)

    penalised = mlp((12,), seed=1)
    a = ewc.anchor(penalised, {n: torch.rand(p.shape) for n, p in penalised.named_parameters()})
    train_task(penalised, (x, y), config, penalty=lambda m: ewc.penalty(m, a, 0.0))

    for (n, p), (_, q) in zip(plain.named_parameters(), penalised.named_parameters(), strict=True):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- online EWC


def test_online_importance_starts_from_the_first_task() -> None:
    new = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, 0.25])}
    running = ewc.online_importance(None, new, 0.3)
    assert running["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert running["b"].tolist() == [0.5, 0.25]
    new["w"][0, 0] = 100.0  # a copy: later changes of F_t leave F alone
    assert running["w"][0, 0].item() == 1.0


def test_online_importance_decays_and_adds_against_hand_values() -> None:
    f1 = {"w": torch.tensor([2.0, 4.0, 8.0]), "b": torch.tensor([1.0])}
    f2 = {"w": torch.tensor([1.0, 0.0, 3.0]), "b": torch.tensor([10.0])}
    f3 = {"w": torch.tensor([0.5, 0.5, 0.5]), "b": torch.tensor([0.0])}
    running = ewc.online_importance(None, f1, 0.5)
    running = ewc.online_importance(running, f2, 0.5)
    # F = 0.5 * F1 + F2
    assert running["w"].tolist() == [2.0, 2.0, 7.0] and running["b"].tolist() == [10.5]
    running = ewc.online_importance(running, f3, 0.5)
    # F = 0.5 * (0.5 * F1 + F2) + F3 = 0.25 F1 + 0.5 F2 + F3
    assert running["w"].tolist() == [1.5, 1.5, 4.0] and running["b"].tolist() == [5.25]
    assert f1["w"].tolist() == [2.0, 4.0, 8.0]  # the inputs are not changed


@pytest.mark.parametrize(("gamma", "expected"), [(0.0, [1.0, 0.0]), (1.0, [3.0, 5.0])])
def test_online_importance_at_the_ends_of_gamma(gamma: float, expected: list[float]) -> None:
    running = {"w": torch.tensor([2.0, 5.0])}
    new = {"w": torch.tensor([1.0, 0.0])}
    # γ = 0 keeps only the latest task's importance, γ = 1 sums them (plain EWC's total)
    assert ewc.online_importance(running, new, gamma)["w"].tolist() == expected


def test_online_importance_key_mismatch_is_an_error() -> None:
    running = {"w": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(ConfigError, match="keys"):
        ewc.online_importance(running, {"w": torch.ones(2)}, 0.5)
    with pytest.raises(ConfigError, match="keys"):
        ewc.online_importance(running, {"w": torch.ones(2), "c": torch.ones(1)}, 0.5)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_online_importance_gamma_outside_the_unit_interval_is_an_error(gamma: float) -> None:
    f = {"w": torch.ones(2)}
    with pytest.raises(ConfigError, match="gamma"):
        ewc.online_importance(None, f, gamma)
    with pytest.raises(ConfigError, match="gamma"):
        ewc.online_importance(f, f, gamma)
