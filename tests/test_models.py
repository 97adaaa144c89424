from __future__ import annotations

import pytest
import torch
from torch import nn

from masq.errors import ConfigError
from masq.models import TF_BIAS, TF_STD, mlp


def test_layers_and_parameter_names() -> None:
    model = mlp((30, 20))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {
        "0.weight": (30, 784),
        "0.bias": (30,),
        "2.weight": (20, 30),
        "2.bias": (20,),
        "4.weight": (10, 20),
        "4.bias": (10,),
    }
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert model(torch.zeros(3, 784)).shape == (3, 10)


def test_torch_init_is_pytorchs_default_with_an_explicit_generator() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = [nn.Linear(784, 30), nn.Linear(30, 20), nn.Linear(20, 10)]
    ours = [m for m in mlp((30, 20), seed=7) if isinstance(m, nn.Linear)]
    for a, b in zip(reference, ours, strict=True):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.bias, b.bias)


@pytest.mark.parametrize("init", ["torch", "tf"])
def test_init_is_seeded_and_leaves_the_global_rng_alone(init: str) -> None:
    before = torch.random.get_rng_state()
    a, b, c = mlp((16,), init=init, seed=3), mlp((16,), init=init, seed=3), mlp((16,), init=init)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_tf_init_is_a_truncated_normal_with_biases_point_one() -> None:
    model = mlp((400, 400), init="tf", seed=0)
    weights = torch.cat([m.weight.flatten() for m in model if isinstance(m, nn.Linear)])
    biases = torch.cat([m.bias for m in model if isinstance(m, nn.Linear)])
    assert weights.abs().max() <= 2 * TF_STD
    # the std of N(0, s^2) truncated at +-2s is 0.8796 s
    assert weights.std().item() == pytest.approx(0.8796 * TF_STD, rel=0.01)
    assert abs(weights.mean().item()) < 1e-3
    assert torch.all(biases == TF_BIAS)


@pytest.mark.parametrize("hidden", [(), [], (0,), (800, 0), (-5,), (2.5,)])
def test_bad_hidden_sizes(hidden: tuple) -> None:
    with pytest.raises(ConfigError, match="hidden"):
        mlp(hidden)


def test_bad_init_and_sizes() -> None:
    with pytest.raises(ConfigError, match="init"):
        mlp((5,), init="xavier")
    with pytest.raises(ConfigError, match="positive"):
        mlp((5,), classes=0)
