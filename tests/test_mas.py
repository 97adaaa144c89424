"""MAS (masq.importance.mas) against its naive twin reference.mas, identities and its contract.

Omega_k = (1/N) sum_n |d ||f(x_n)||^2 / d theta_k|: the fast code uses |Delta|^T |A| for linear
layers and torch.func for the rest; the reference one backward per sample in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from masq.errors import ConfigError
from masq.importance import MeasureContext, batches, get_measure, mas, persample, reference
from tests.test_importance import (
    RTOL,
    RTOL32,
    assert_importance_close,
    assert_masked_equals_truncated,
    assert_same,
    mlp,
    seeded,
    single,
    snapshot,
    truncated,
)


class Normed(nn.Module):
    """Linear -> LayerNorm (trainable, not Linear: torch.func) -> tanh -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x))))


def convnet() -> nn.Module:
    return seeded(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 4)), 1
    )


MODELS = {
    "mlp": lambda: mlp([5, 6, 4], seed=0),
    "mlp-relu-nobias": lambda: mlp([5, 7, 3, 4], bias=False, act=nn.ReLU, seed=1),
    "layernorm": lambda: seeded(Normed(), 2),
    "conv": convnet,
    # a linear layer on a [B, 3, 5] input: rows are not samples, so it leaves the closed form
    "sequence": lambda: seeded(
        nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)), 3
    ),
}
HEAD = {"mlp": "2", "mlp-relu-nobias": "4", "layernorm": "out", "conv": "3", "sequence": "3"}


def data(name: str, n: int = 7, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n samples; labels in 0..3 (MAS does not read them)."""
    g = torch.Generator().manual_seed(seed)
    shape = {"conv": (n, 1, 6, 6), "sequence": (n, 3, 5)}.get(name, (n, 5))
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (n,), generator=g
    )


def max_deviation(got: dict[str, Tensor], want: dict[str, Tensor]) -> tuple[float, float]:
    """(max |got - want|, max |got - want| / max |want| per tensor) over all tensors."""
    abs_dev = max(float((got[k].double() - want[k]).abs().max()) for k in want)
    rel_dev = max(
        float((got[k].double() - want[k]).abs().max() / want[k].abs().max()) for k in want
    )
    return abs_dev, rel_dev


# ---------------------------------------------------------------------- against the reference


@pytest.mark.parametrize(("n", "size"), [(7, 3), (23, 5)])  # uneven splits: 3+3+1, 5x4+3
@pytest.mark.parametrize("name", list(MODELS))
def test_mas_matches_reference(name: str, n: int, size: int) -> None:
    model = MODELS[name]()
    x, y = data(name, n)
    got = mas(model, batches(x, y, size))
    assert all(t.dtype == torch.float64 for t in got.values())
    assert_importance_close(got, reference.mas(model, batches(x, y, size)))


@pytest.mark.parametrize("name", list(MODELS))
def test_mas_float32_matches_reference(name: str) -> None:
    """float32 against the float64 reference on the same (rounded) parameters; tolerance as for
    the Fisher (tests/test_importance.py, RTOL32)."""
    model = single(MODELS[name]())
    x, y = data(name, 23)
    got = mas(model, batches(x.float(), y, 5))
    assert all(t.dtype == torch.float32 for t in got.values())
    want = reference.mas(model, batches(x.float(), y, 5))
    assert_importance_close({k: v.double() for k, v in got.items()}, want, rtol=RTOL32)


@pytest.mark.parametrize("name", list(MODELS))
def test_mas_independent_of_batch_split(name: str) -> None:
    model = MODELS[name]()
    x, y = data(name, 7)
    whole = mas(model, [(x, y)])
    for size in (1, 2, 3, 5):
        assert_importance_close(mas(model, batches(x, y, size)), whole)


def test_mas_of_a_linear_model_by_hand() -> None:
    """f = W x + b: d ||f||^2 / dW = 2 f x^T and d/db = 2 f, so Omega_W = (2/N) sum_n |f_n| |x_n|^T
    and Omega_b = (2/N) sum_n |f_n|."""
    model = mlp([5, 3], seed=4)
    x, y = data("mlp", 9)
    f = model(x).detach()
    got = mas(model, batches(x, y, 4))
    want = {
        "0.weight": 2 * (f.abs()[:, :, None] * x.abs()[:, None, :]).mean(0),
        "0.bias": 2 * f.abs().mean(0),
    }
    assert_importance_close(got, want)


def test_mas_is_not_the_absolute_batch_gradient() -> None:
    """Per-sample absolute values: at least the absolute mean gradient, and larger somewhere."""
    model = MODELS["mlp"]()
    x, y = data("mlp", 7)
    rows = reference.per_sample_gradients(model, x, y, loss=lambda z, _: z.square().sum(1))
    got = mas(model, [(x, y)])
    for k, g in rows.items():
        assert bool((got[k] >= g.mean(0).abs() * (1 - 1e-12)).all()), k
    assert any(bool((got[k] > rows[k].mean(0).abs() * 1.01).any()) for k in rows)


@pytest.mark.parametrize("name", ["conv", "layernorm"])
def test_mas_independent_of_buffer_bytes(name: str) -> None:
    """64-byte buffers: one sample per torch.func chunk; the same sums (float64)."""
    model = MODELS[name]()
    x, y = data(name, 7)
    assert_importance_close(
        mas(model, batches(x, y, 3), buffer_bytes=64), mas(model, batches(x, y, 3))
    )


# ------------------------------------------------------------------- task-incremental outputs


@pytest.mark.parametrize("name", list(MODELS))
def test_mas_outputs_equal_a_truncated_head(name: str) -> None:
    model = MODELS[name]()
    x, y = data(name, 7)
    units = [3, 1]
    masked = mas(model, batches(x, y, 3), outputs=units)
    small = mas(truncated(model, HEAD[name], units), batches(x, y, 3))
    assert_masked_equals_truncated(masked, small, HEAD[name], units, RTOL)
    want = reference.mas(model, batches(x, y, 3), outputs=units)
    assert_importance_close(masked, want)
    tensor_units = mas(model, batches(x, y, 3), outputs=torch.tensor(units))
    assert_importance_close(tensor_units, masked, rtol=0.0)


def test_mas_outputs_float32_matches_reference() -> None:
    model = single(MODELS["conv"]())
    x, y = data("conv", 23)
    got = mas(model, batches(x.float(), y, 5), outputs=(0, 2))
    want = reference.mas(model, batches(x.float(), y, 5), outputs=(0, 2))
    assert_importance_close({k: v.double() for k, v in got.items()}, want, rtol=RTOL32)


def test_mas_ignores_labels_outside_outputs() -> None:
    """MAS reads no labels, so labels outside ``outputs`` are no error."""
    model = MODELS["mlp"]()
    x, y = data("mlp", 7)
    a = mas(model, batches(x, y, 3), outputs=[0])
    b = mas(model, batches(x, torch.full_like(y, 3), 3), outputs=[0])
    assert_importance_close(a, b, rtol=0.0)


# --------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ["conv", "layernorm", "mlp-relu-nobias"])
def test_mas_leaves_the_model_as_found(name: str) -> None:
    model = MODELS[name]()
    model.train()
    next(iter(model.children())).eval()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 3.0)
    x, y = data(name, 7)
    before = snapshot(model)
    mas(model, batches(x, y, 3))
    mas(model, batches(x, y, 3), outputs=[1, 2])
    assert_same(before, snapshot(model))


def test_mas_on_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """device= another device: forced here by persample.placement answering "copy"; the results
    are those of the in-place path, in each parameter's dtype, and the model is untouched."""
    model = single(MODELS["layernorm"]())
    x, y = data("layernorm", 7)
    model.train()
    before = snapshot(model)
    want = mas(model, batches(x.float(), y, 3), device="cpu")
    placement = persample.placement
    monkeypatch.setattr(persample, "placement", lambda m, d: (placement(m, d)[0], True))
    got = mas(model, batches(x.float(), y, 3), device="cpu")
    assert_same(before, snapshot(model))
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_importance_close(got, want, rtol=0.0)


def test_mas_frozen_parameters_are_left_out() -> None:
    model = MODELS["layernorm"]()
    model.norm.weight.requires_grad_(False)
    x, y = data("layernorm", 7)
    got = mas(model, batches(x, y, 3))
    assert "norm.weight" not in got
    assert_importance_close(got, reference.mas(model, batches(x, y, 3)))


def test_mas_measure_in_the_registry() -> None:
    measure = get_measure("mas")
    assert (measure.timing, measure.text({}), measure.standalone) == ("after", "MAS", True)
    model = MODELS["mlp"]()
    x, y = data("mlp", 7)
    ctx = MeasureContext(batch_size=3, outputs=(2, 0))
    assert measure.compute is not None
    got = measure.compute(model, (x, y), ctx)
    assert_importance_close(got, mas(model, batches(x, y, 3), outputs=(2, 0)), rtol=0.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: mas(m, []),
        lambda m, x, y: mas(m, [(x, y[:-1])]),
        lambda m, x, y: mas(m, [(x[:, :4], y)]),
        lambda m, x, y: mas(m, [(x.clone().fill_(float("nan")), y)]),
        lambda m, x, y: mas(m, [(x, y)], buffer_bytes=0),
        lambda m, x, y: mas(m, [(x, y)], outputs=[]),
        lambda m, x, y: mas(m, [(x, y)], outputs=[1, 1]),
        lambda m, x, y: mas(m, [(x, y)], outputs=[-1]),
        lambda m, x, y: mas(m, [(x, y)], outputs=[4]),
        lambda m, x, y: mas(m, [(x, y)], outputs=[0.5]),
        lambda m, x, y: mas(m, [(x, y)], outputs=torch.tensor([[0, 1]])),
    ],
)
def test_mas_user_errors_raise_config_error(call) -> None:
    model = MODELS["mlp"]()
    x, y = data("mlp", 7)
    with pytest.raises(ConfigError) as info:
        call(model, x, y)
    assert "\n" not in str(info.value)
