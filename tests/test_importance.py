"""masq.importance against its naive references (masq.importance.reference) and identities."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from masq.errors import ConfigError
from masq.importance import (
    BlockStats,
    FisherLabels,
    Scale,
    batches,
    blocks,
    fisher,
    fisher_block_stats,
    mas,
    masq,
    persample,
    reference,
    summary,
)
from masq.importance.blocks import fisher_block

RTOL = 1e-10


def seeded(model: nn.Module, seed: int) -> nn.Module:
    """The model in float64 with N(0, 0.6^2) parameters from an explicit generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g))
    return model.double()


def mlp(sizes: list[int], bias: bool = True, act: type[nn.Module] = nn.Tanh, seed: int = 0):
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True) if act is nn.ReLU else act())
    return seeded(nn.Sequential(*layers), seed)


def convnet(seed: int = 0) -> nn.Module:
    layers = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    return seeded(layers, seed)


class Reused(nn.Module):
    """One linear layer called twice and a frozen one: both leave the closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.out.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden(h))
        return self.out(h)


MODELS = {
    "mlp-5-4-3": lambda: mlp([5, 4, 3]),
    "mlp-5-6-7-4-nobias-relu": lambda: mlp([5, 6, 7, 4], bias=False, act=nn.ReLU),
    "mlp-5-3": lambda: mlp([5, 3], seed=2),
    "mlp-5-8-2-3-relu": lambda: mlp([5, 8, 2, 3], act=nn.ReLU, seed=3),
    "conv": convnet,
    "reused": lambda: seeded(Reused(), 1),
    # a linear layer on a [B, 3, 5] input: rows are not samples, so it leaves the closed form
    "sequence": lambda: seeded(
        nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), 5
    ),
}


def data(model_name: str, n: int = 23, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = {"conv": (n, 1, 6, 6), "sequence": (n, 3, 5)}.get(model_name, (n, 5))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3 if model_name != "mlp-5-6-7-4-nobias-relu" else 4, (n,), generator=g)
    return x, y


def assert_importance_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol=RTOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=name)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def single(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` (the dtype of production runs)."""
    return copy.deepcopy(model).float()


def truncated(model: nn.Module, head: str, units: list[int]) -> nn.Module:
    """A copy of ``model`` whose last linear layer keeps only the rows ``units``."""
    small = copy.deepcopy(model)
    old = small.get_submodule(head)
    new = nn.Linear(old.in_features, len(units), bias=old.bias is not None, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[units])
        if old.bias is not None:
            new.bias.copy_(old.bias[units])
            new.bias.requires_grad_(old.bias.requires_grad)
    parent, _, leaf = head.rpartition(".")
    setattr(small.get_submodule(parent) if parent else small, leaf, new)
    return small


def assert_masked_equals_truncated(
    masked: dict[str, Tensor], small: dict[str, Tensor], head: str, units: list[int], rtol: float
) -> None:
    """Every tensor equal; the head's rows ``units`` as the truncated head's, the rest 0."""
    assert masked.keys() == small.keys()
    rest = [k for k in masked if not k.startswith(f"{head}.")]
    assert_importance_close({k: masked[k] for k in rest}, {k: small[k] for k in rest}, rtol=rtol)
    for k in (f"{head}.weight", f"{head}.bias"):
        if k not in masked:
            continue
        kept = masked[k][units]
        assert_importance_close({k: kept}, {k: small[k]}, rtol=rtol)
        others = [u for u in range(len(masked[k])) if u not in units]
        assert torch.equal(masked[k][others], torch.zeros_like(masked[k][others])), k


# float32 against the float64 references: the references run on a float64 copy of the same float32
# parameters, so every difference is rounding in the fast code's float32 arithmetic. Unit roundoff
# is 6e-8; a forward and backward through these tiny nets and a sum over 23 samples accumulate a
# few dozen roundings, and the largest deviation observed over the grid is 5e-7 of a tensor's
# maximum. 1e-5 of the maximum (relative and absolute) leaves a margin of 20 while still catching
# any slip of the formula (a wrong factor, a lost sample or batch moves results by 1e-2 or more).
RTOL32 = 1e-5


# ------------------------------------------------------------------------------- fisher


@pytest.mark.parametrize("labels", list(FisherLabels))
@pytest.mark.parametrize("name", list(MODELS))
def test_fisher_matches_reference(name: str, labels: FisherLabels) -> None:
    model = MODELS[name]()
    x, y = data(name)
    got = fisher(model, batches(x, y, 5), labels=labels, generator=gen())
    want = reference.fisher(model, batches(x, y, 5), labels=labels, generator=gen())
    assert_importance_close(got, want)


# labels="sample" is left out: the draws come from the softmax in the model's dtype, so float32
# and float64 draw different labels from the same seed (the float64 test above covers it).
# "predicted" is in: the argmax of these random nets has no near-ties at float32 rounding.
@pytest.mark.parametrize(
    "labels",
    [FisherLabels.EMPIRICAL, FisherLabels.EXACT, FisherLabels.PREDICTED, FisherLabels.BATCHED],
)
@pytest.mark.parametrize("name", list(MODELS))
def test_fisher_float32_matches_reference(name: str, labels: FisherLabels) -> None:
    model = single(MODELS[name]())
    x, y = data(name)
    got = fisher(model, batches(x.float(), y, 5), labels=labels)
    assert all(t.dtype == torch.float32 for t in got.values())
    want = reference.fisher(model, batches(x.float(), y, 5), labels=labels)
    assert_importance_close({k: v.double() for k, v in got.items()}, want, rtol=RTOL32)


@pytest.mark.parametrize(
    ("name", "labels", "sizes"),
    [
        ("mlp-5-8-2-3-relu", "true", (1, 4, 23)),
        ("mlp-5-8-2-3-relu", "exact", (1, 4, 23)),
        ("conv", "true", (2, 23)),
        ("conv", "exact", (4, 23)),
    ],
)
def test_fisher_independent_of_batch_size(name: str, labels: str, sizes: tuple[int, ...]) -> None:
    model = MODELS[name]()
    x, y = data(name)
    results = [fisher(model, batches(x, y, b), labels=labels) for b in sizes]
    for other in results[1:]:
        assert_importance_close(other, results[0])


@pytest.mark.parametrize("name", ["conv", "sequence", "reused"])
def test_fisher_independent_of_buffer_bytes(name: str) -> None:
    """64-byte buffers: one sample per torch.func chunk; the same sums (float64)."""
    model = MODELS[name]()
    x, y = data(name)
    for labels in ("true", "exact"):
        assert_importance_close(
            fisher(model, batches(x, y, 5), labels=labels, buffer_bytes=64),
            fisher(model, batches(x, y, 5), labels=labels),
        )


def test_fisher_keys_are_trainable_parameters_only() -> None:
    model = MODELS["reused"]()
    x, y = data("reused")
    imp = fisher(model, batches(x, y, 7))
    assert list(imp) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(imp[n].shape == p.shape for n, p in model.named_parameters() if n in imp)


def test_fisher_custom_loss() -> None:
    """A per-sample loss other than cross-entropy: half the squared error to a one-hot target."""

    def mse(logits: Tensor, y: Tensor) -> Tensor:
        target = torch.zeros_like(logits).scatter(1, y[:, None], 1.0)  # one-hot, vmap-safe
        return 0.5 * (logits - target).square().sum(1)

    model = MODELS["conv"]()
    x, y = data("conv")
    got = fisher(model, batches(x, y, 6), loss=mse)
    assert_importance_close(got, reference.fisher(model, batches(x, y, 6), loss=mse))


# --------------------------------------------------------------------------------- masq


MASQ_MODELS = ["mlp-5-6-7-4-nobias-relu", "conv", "reused"]


@pytest.mark.parametrize("scale", list(Scale))
@pytest.mark.parametrize("name", MASQ_MODELS)
def test_masq_matches_reference(name: str, scale: Scale) -> None:
    model = MODELS[name]()
    x, y = data(name)
    got = masq(model, batches(x, y, 5), scale=scale)
    assert_importance_close(got, reference.masq(model, batches(x, y, 5), scale=scale))


@pytest.mark.parametrize("scale", list(Scale))
@pytest.mark.parametrize("name", MASQ_MODELS)
def test_masq_float32_matches_reference(name: str, scale: Scale) -> None:
    model = single(MODELS[name]())
    x, y = data(name)
    got = masq(model, batches(x.float(), y, 5), scale=scale)
    assert all(t.dtype == torch.float32 for t in got.values())
    want = reference.masq(model, batches(x.float(), y, 5), scale=scale)
    assert_importance_close({k: v.double() for k, v in got.items()}, want, rtol=RTOL32)


@pytest.mark.parametrize("scale", ["mean", "sum"])
def test_masq_with_batch_size_one_is_fisher(scale: str) -> None:
    model = MODELS["mlp-5-8-2-3-relu"]()
    x, y = data("mlp-5-8-2-3-relu")
    assert_importance_close(masq(model, batches(x, y, 1), scale=scale), fisher(model, [(x, y)]))


@pytest.mark.parametrize(("name", "sizes"), [("mlp-5-8-2-3-relu", (2, 3, 5, 23)), ("conv", (5,))])
def test_masq_at_most_fisher(name: str, sizes: tuple[int, ...]) -> None:
    model = MODELS[name]()
    x, y = data(name)
    for size in sizes:
        low, high = masq(model, batches(x, y, size)), fisher(model, batches(x, y, size))
        for k in high:
            assert bool((low[k] <= high[k] * (1 + 1e-12)).all()), k


def test_masq_sum_is_batch_size_times_mean() -> None:
    model = MODELS["mlp-5-4-3"]()
    x, y = data("mlp-5-4-3", n=24)
    mean = masq(model, batches(x, y, 6), scale="mean")
    assert_importance_close(
        masq(model, batches(x, y, 6), scale="sum"), {k: 6 * v for k, v in mean.items()}
    )


def test_masq_full_batch_is_squared_gradient() -> None:
    model = MODELS["mlp-5-4-3"]()
    x, y = data("mlp-5-4-3")
    rows = reference.per_sample_gradients(model, x, y)
    want = {k: g.mean(0) ** 2 for k, g in rows.items()}
    assert_importance_close(masq(model, [(x, y)]), want)


# ------------------------------------------------------------------- task-incremental outputs

# (model, its last linear layer, the active units of the task)
OUTPUT_CASES = [
    ("mlp-5-8-2-3-relu", "4", [2, 0]),
    ("mlp-5-6-7-4-nobias-relu", "4", [3, 1]),
    ("mlp-5-3", "0", [1, 2]),
    ("conv", "3", [0, 2]),
    ("reused", "out", [2, 1]),  # out.bias frozen
    ("sequence", "3", [1]),
]


def task_data(model_name: str, units: list[int], n: int = 23) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y with labels among ``units`` (units of the full head), their positions in units)."""
    x, _ = data(model_name, n)
    positions = torch.randint(0, len(units), (n,), generator=torch.Generator().manual_seed(5))
    return x, torch.tensor(units)[positions], positions


@pytest.mark.parametrize("labels", list(FisherLabels))
@pytest.mark.parametrize(("name", "head", "units"), OUTPUT_CASES)
def test_fisher_outputs_equal_a_truncated_head(
    name: str, head: str, units: list[int], labels: FisherLabels
) -> None:
    """outputs=U: the Fisher of a head that keeps only the rows U (labels their positions in
    U), zero in the other rows of the head; and the reference twin's value."""
    model = MODELS[name]()
    x, y, positions = task_data(name, units)
    masked = fisher(model, batches(x, y, 5), labels=labels, generator=gen(), outputs=units)
    small = truncated(model, head, units)
    want = fisher(small, batches(x, positions, 5), labels=labels, generator=gen())
    assert_masked_equals_truncated(masked, want, head, units, RTOL)
    slow = reference.fisher(model, batches(x, y, 5), labels=labels, generator=gen(), outputs=units)
    assert_importance_close(masked, slow)


@pytest.mark.parametrize("scale", list(Scale))
@pytest.mark.parametrize(("name", "head", "units"), OUTPUT_CASES)
def test_masq_outputs_equal_a_truncated_head(
    name: str, head: str, units: list[int], scale: Scale
) -> None:
    model = MODELS[name]()
    x, y, positions = task_data(name, units)
    masked = masq(model, batches(x, y, 5), scale=scale, outputs=units)
    want = masq(truncated(model, head, units), batches(x, positions, 5), scale=scale)
    assert_masked_equals_truncated(masked, want, head, units, RTOL)
    slow = reference.masq(model, batches(x, y, 5), scale=scale, outputs=units)
    assert_importance_close(masked, slow)


def test_outputs_float32_match_reference() -> None:
    model = single(MODELS["conv"]())
    x, y, _ = task_data("conv", [2, 0])
    x = x.float()
    got = {
        "true": fisher(model, batches(x, y, 5), outputs=[2, 0]),
        "exact": fisher(model, batches(x, y, 5), labels="exact", outputs=[2, 0]),
        "masq": masq(model, batches(x, y, 5), outputs=[2, 0]),
    }
    want = {
        "true": reference.fisher(model, batches(x, y, 5), outputs=[2, 0]),
        "exact": reference.fisher(model, batches(x, y, 5), labels="exact", outputs=[2, 0]),
        "masq": reference.masq(model, batches(x, y, 5), outputs=[2, 0]),
    }
    for key, imp in got.items():
        assert all(t.dtype == torch.float32 for t in imp.values())
        assert_importance_close({k: v.double() for k, v in imp.items()}, want[key], rtol=RTOL32)


def test_outputs_none_and_all_units_in_order_agree() -> None:
    """outputs = every unit in order is the full head: the same numbers as outputs=None."""
    model = MODELS["conv"]()
    x, y = data("conv")
    for run in (
        lambda o: fisher(model, batches(x, y, 5), labels="exact", outputs=o),
        lambda o: masq(model, batches(x, y, 5), outputs=o),
        lambda o: mas(model, batches(x, y, 5), outputs=o),
    ):
        assert_importance_close(run([0, 1, 2]), run(None))


def test_outputs_sampled_labels_range_over_the_active_units() -> None:
    """With one active unit every drawn label is that unit: the Fisher of the loss -log 1 = 0
    through softmax over one logit is exactly 0."""
    model = MODELS["mlp-5-4-3"]()
    x, y = data("mlp-5-4-3")
    imp = fisher(model, batches(x, y, 5), labels="sampled", generator=gen(), outputs=[1])
    assert all(bool((t == 0).all()) for t in imp.values())


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: fisher(m, batches(x, y, 5), outputs=[0, 1]),
        lambda m, x, y: masq(m, batches(x, y, 5), outputs=[0, 1]),
        lambda m, x, y: reference.fisher(m, batches(x, y, 5), outputs=[0, 1]),
        lambda m, x, y: reference.masq(m, batches(x, y, 5), outputs=[0, 1]),
        lambda m, x, y: fisher(m, batches(x, y, 5), outputs=[0, 3]),
        lambda m, x, y: masq(m, batches(x, y.double(), 5), outputs=[0, 1, 2]),
    ],
)
def test_outputs_user_errors(call) -> None:
    """A label outside outputs (y holds 0, 1 and 2), a unit the model lacks, soft labels."""
    model = MODELS["mlp-5-4-3"]()
    x, y = data("mlp-5-4-3")
    assert set(y.tolist()) == {0, 1, 2}
    with pytest.raises(ConfigError) as info:
        call(model, x, y)
    assert "\n" not in str(info.value)


def test_outputs_labels_unused_by_sampled_and_exact_fisher() -> None:
    """labels="sampled"/"exact" do not read y, so labels outside outputs are no error there."""
    model = MODELS["mlp-5-4-3"]()
    x, y = data("mlp-5-4-3")
    fisher(model, batches(x, y, 5), labels="exact", outputs=[0, 1])
    fisher(model, batches(x, y, 5), labels="sampled", generator=gen(), outputs=[0, 1])


# ------------------------------------------------------------------------ block statistics

EXACT_FIELDS = [
    "diag_sum",
    "diag_mean",
    "offdiag_sum",
    "offdiag_mean",
    "offdiag_abs_sum",
    "offdiag_abs_mean",
]


BLOCK_CASES = [
    ("mlp-5-4-3", "0.weight"),
    ("mlp-5-4-3", "0.bias"),
    ("mlp-5-4-3", "2.weight"),
    ("mlp-5-6-7-4-nobias-relu", "2.weight"),
    ("conv", "0.weight"),
    ("conv", "3.weight"),
    ("reused", "hidden.weight"),
    ("reused", "out.weight"),
    ("sequence", "0.weight"),
]


@pytest.mark.parametrize(("model_name", "tensor"), BLOCK_CASES)
def test_block_stats_exact_matches_reference(model_name: str, tensor: str) -> None:
    model = MODELS[model_name]()
    x, y = data(model_name)
    got = fisher_block_stats(model, batches(x, y, 5), tensor)
    want = reference.fisher_block_stats(model, batches(x, y, 5), tensor)
    assert isinstance(got, BlockStats) and not got.estimated
    assert got.offdiag_abs_sum_ci is None and got.offdiag_abs_mean_ci is None
    size = dict(model.named_parameters())[tensor].numel()
    assert (got.name, got.num_params, got.num_samples) == (want.name, size, len(x))
    assert (got.diag_count, got.offdiag_count) == (size, size * size - size)
    assert (want.diag_count, want.offdiag_count) == (got.diag_count, got.offdiag_count)
    for field in EXACT_FIELDS:
        assert math.isclose(
            getattr(got, field), getattr(want, field), rel_tol=1e-9, abs_tol=1e-15
        ), field


@pytest.mark.parametrize(("model_name", "tensor"), BLOCK_CASES)
def test_block_stats_float32_matches_reference(model_name: str, tensor: str) -> None:
    """Float32 per-sample gradients against the float64 block; the tolerance is RTOL32 of a scale.

    The signed off-diagonal sum is the difference total - diagonal of two float32-rounded sums
    of the size of diag + |offdiag|, so its error scales with that, not with its own (possibly
    cancelling) value; the scale of every sum is therefore diag_sum + offdiag_abs_sum (of the
    reference), and of every mean that scale over the number of entries averaged.
    """
    model = single(MODELS[model_name]())
    x, y = data(model_name)
    got = fisher_block_stats(model, batches(x.float(), y, 5), tensor)
    want = reference.fisher_block_stats(model, batches(x.float(), y, 5), tensor)
    assert not got.estimated and (got.num_params, got.num_samples) == (want.num_params, len(x))
    scale = want.diag_sum + want.offdiag_abs_sum
    counts = {"diag": want.diag_count, "offdiag": want.offdiag_count}
    for field in EXACT_FIELDS:
        part = field.split("_")[0]
        tol = RTOL32 * (scale if field.endswith("sum") else scale / counts[part])
        assert abs(getattr(got, field) - getattr(want, field)) <= tol, field


@pytest.mark.parametrize(("model_name", "tensor"), BLOCK_CASES)
def test_fisher_block_matches_reference(model_name: str, tensor: str) -> None:
    """The whole block against G^T G / N of the explicit per-sample gradients, float64 and
    float32 (tolerance RTOL32 of the largest entry); its diagonal is the FIM of the tensor."""
    model = MODELS[model_name]()
    x, y = data(model_name)
    got = fisher_block(model, batches(x, y, 5), tensor)
    want = reference.fisher_block(model, batches(x, y, 5), tensor)
    size = dict(model.named_parameters())[tensor].numel()
    assert got.shape == (size, size) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))
    diagonal = fisher(model, batches(x, y, 4))[tensor].reshape(-1)
    torch.testing.assert_close(got.diagonal(), diagonal, rtol=RTOL, atol=0.0)
    small = single(model)
    got32 = fisher_block(small, batches(x.float(), y, 5), tensor, buffer_bytes=64)
    want32 = reference.fisher_block(small, batches(x.float(), y, 5), tensor)
    assert got32.dtype == torch.float64  # accumulated in float64 from float32 gradients
    torch.testing.assert_close(got32, want32, rtol=RTOL32, atol=RTOL32 * float(want32.abs().max()))


def test_block_stats_diagonal_is_fisher_sum() -> None:
    model = MODELS["mlp-5-8-2-3-relu"]()
    x, y = data("mlp-5-8-2-3-relu")
    imp = fisher(model, batches(x, y, 4))
    for name, values in imp.items():
        stats = fisher_block_stats(model, batches(x, y, 6), name)
        assert math.isclose(stats.diag_sum, float(values.sum()), rel_tol=1e-12), name


def test_block_stats_estimate_covers_exact() -> None:
    model = mlp([12, 10, 3], seed=4)
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(40, 12, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (40,), generator=g),
    )
    exact = fisher_block_stats(model, batches(x, y, 16), "0.weight")
    covered = 0
    for seed in range(12):
        est = fisher_block_stats(
            model,
            batches(x, y, 16),
            "0.weight",
            max_exact_params=50,
            samples=3000,
            generator=gen(seed),
        )
        assert est.estimated and est.sampled_entries == 3000 and est.confidence == 0.95
        assert est.diag_sum == pytest.approx(exact.diag_sum, rel=1e-12)
        assert est.offdiag_sum == pytest.approx(exact.offdiag_sum, rel=1e-9, abs=1e-15)
        low, high = est.offdiag_abs_mean_ci
        assert low <= est.offdiag_abs_mean <= high
        assert est.offdiag_abs_sum == pytest.approx(est.offdiag_abs_mean * exact.offdiag_count)
        assert est.offdiag_abs_mean == pytest.approx(exact.offdiag_abs_mean, rel=0.1)
        covered += low <= exact.offdiag_abs_mean <= high
    assert covered >= 9  # nominal 95 %: expect 11 or 12 of 12


def test_block_stats_estimate_is_reproducible() -> None:
    model = MODELS["conv"]()
    x, y = data("conv")
    runs = [
        fisher_block_stats(
            model, batches(x, y, 5), "0.weight", max_exact_params=4, generator=gen(1)
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_block_stats_independent_of_buffer_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny buffers force many feature blocks, flushes, pair steps and torch.func chunks (conv):
    the same statistics."""
    model = MODELS["mlp-5-8-2-3-relu"]()
    x, y = data("mlp-5-8-2-3-relu")
    conv = MODELS["conv"]()
    xc, yc = data("conv")
    names = ["0.weight", "2.weight", "2.bias"]

    def run(buffer_bytes: int) -> list[BlockStats]:
        exact = [
            fisher_block_stats(model, batches(x, y, 5), n, buffer_bytes=buffer_bytes) for n in names
        ]
        estimated = fisher_block_stats(
            model,
            batches(x, y, 5),
            "0.weight",
            max_exact_params=0,
            samples=40,
            generator=gen(2),
            buffer_bytes=buffer_bytes,
        )
        dense = fisher_block_stats(conv, batches(xc, yc, 5), "0.weight", buffer_bytes=buffer_bytes)
        return [*exact, estimated, dense]

    normal = run(persample.DEFAULT_BUFFER_BYTES)
    monkeypatch.setattr(blocks._KronBlock, "_ROWS", 3)  # a class constant, not a buffer size
    for got, want in zip(run(64), normal, strict=True):
        for field in EXACT_FIELDS:
            assert math.isclose(getattr(got, field), getattr(want, field), rel_tol=1e-12), field


# ------------------------------------------------------------------------- model untouched


def snapshot(model: nn.Module) -> tuple:
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_same(before: tuple, after: tuple) -> None:
    params, grads, modes, flags = before
    params2, grads2, modes2, flags2 = after
    assert all(torch.equal(params[n], params2[n]) for n in params)
    assert [g is None for g in grads.values()] == [g is None for g in grads2.values()]
    assert all(g is None or torch.equal(g, grads2[n]) for n, g in grads.items())
    assert modes == modes2 and flags == flags2


@pytest.mark.parametrize("name", ["conv", "reused", "mlp-5-6-7-4-nobias-relu"])
def test_model_left_as_found(name: str) -> None:
    model = MODELS[name]()
    model.train()
    next(iter(model.children())).eval()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 3.0)
    x, y = data(name)
    before = snapshot(model)
    fisher(model, batches(x, y, 5))
    fisher(model, batches(x, y, 5), labels="exact")
    fisher(model, batches(x, y, 5), labels="sampled", generator=gen())
    masq(model, batches(x, y, 5), scale="sum")
    mas(model, batches(x, y, 5))
    tensor = next(n for n, p in model.named_parameters() if p.requires_grad)
    fisher_block(model, batches(x, y, 5), tensor)
    fisher_block_stats(model, batches(x, y, 5), tensor)
    fisher_block_stats(model, batches(x, y, 5), tensor, max_exact_params=1, samples=50)
    assert_same(before, snapshot(model))


# ------------------------------------------------------------------- computing on a copy


def every_measure(model: nn.Module, x: Tensor, y: Tensor, device: str | None) -> list[object]:
    """fisher (true, exact), masq (mean, sum), mas, the whole block and exact block statistics
    of one tensor."""
    return [
        fisher(model, batches(x, y, 5), device=device),
        fisher(model, batches(x, y, 5), labels="exact", device=device),
        masq(model, batches(x, y, 5), device=device),
        masq(model, batches(x, y, 5), scale="sum", device=device),
        mas(model, batches(x, y, 5), device=device),
        fisher_block(model, batches(x, y, 5), "0.weight", device=device),
        fisher_block_stats(model, batches(x, y, 5), "0.weight", device=device),
    ]


def assert_same_results(got: list, want: list, model: nn.Module, rtol: float) -> None:
    """Results close, each importance tensor on the device and in the dtype of its parameter."""
    params = dict(model.named_parameters())
    for a, b in zip(got, want, strict=True):
        if isinstance(a, BlockStats):  # offdiag_sum may cancel: tolerance relative to a scale
            scale = b.diag_sum + b.offdiag_abs_sum
            for field in EXACT_FIELDS:
                assert math.isclose(
                    getattr(a, field), getattr(b, field), rel_tol=rtol, abs_tol=rtol * scale
                ), field
            continue
        if isinstance(a, Tensor):  # a whole block: float64, on the parameter's device
            assert (a.device, a.dtype) == (params["0.weight"].device, torch.float64)
            torch.testing.assert_close(
                a, b.to(a.device), rtol=rtol, atol=rtol * float(b.abs().max())
            )
            continue
        for name, t in a.items():
            assert (t.device, t.dtype) == (params[name].device, params[name].dtype), name
        assert_importance_close(a, {k: v.to(a[k].device) for k, v in b.items()}, rtol=rtol)


def test_copy_path_computes_on_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """device= another device computes on a moved copy. With one device only, force that branch
    (persample.placement answers "copy" for the model's own device) and check what it promises:
    every forward runs on the copy, in eval mode; the caller's model (weights, .grad, train/eval
    and requires_grad flags) is not touched; results equal the in-place path's, each in its
    parameter's dtype (float32 here, while the sums are float64) and on its device."""
    model = single(MODELS["conv"]())  # conv: torch.func and closed-form paths both run
    x, y = data("conv")
    x = x.float()
    model.train()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 3.0)
    before = snapshot(model)
    ran: list[tuple[int, bool]] = []  # (id, training) of every module whose forward ran
    for m in model.modules():  # deep-copied with the model: records whichever module ran
        m.register_forward_hook(lambda module, args, out: ran.append((id(module), module.training)))

    want = every_measure(model, x, y, device="cpu")  # the model's own device: no copy
    own = {id(m) for m in model.modules()}
    assert ran and all(i in own and not training for i, training in ran)

    ran.clear()
    placement = persample.placement
    monkeypatch.setattr(persample, "placement", lambda m, d: (placement(m, d)[0], True))
    got = every_measure(model, x, y, device="cpu")
    assert ran and all(i not in own and not training for i, training in ran)
    assert_same(before, snapshot(model))
    assert_same_results(got, want, model, rtol=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device to compute on another device"
)
@pytest.mark.parametrize("home", ["cpu", "cuda"])
def test_other_device_matches_own_device(home: str) -> None:
    """A model on ``home`` computed on the other device: the same values as on ``home``, returned
    on ``home``, and the model untouched (float64: the two devices' sums agree to rounding)."""
    other = "cpu" if home == "cuda" else "cuda"
    model = MODELS["conv"]().to(home)
    x, y = data("conv")
    x, y = x.to(home), y.to(home)
    model.train()
    before = snapshot(model)
    got = every_measure(model, x, y, device=other)
    assert_same(before, snapshot(model))
    assert_same_results(got, every_measure(model, x, y, device=None), model, rtol=1e-9)


# ---------------------------------------------------------------------------- properties


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    n=st.integers(1, 13),
    batch_size=st.integers(1, 8),
    bias=st.booleans(),
)
def test_property_fisher_and_masq_one(
    widths: list[int], n: int, batch_size: int, bias: bool
) -> None:
    model = mlp([4, *widths, 3], bias=bias, act=nn.ReLU, seed=n)
    g = torch.Generator().manual_seed(n)
    x, y = (
        torch.randn(n, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=g),
    )
    imp = fisher(model, batches(x, y, batch_size))
    assert_importance_close(imp, reference.fisher(model, batches(x, y, batch_size)))
    assert_importance_close(masq(model, batches(x, y, 1)), imp)


# ---------------------------------------------------------------------------- small API


def test_batches_in_order_with_short_last_batch() -> None:
    x, y = torch.arange(7.0), torch.arange(7)
    parts = list(batches(x, y, 3))
    assert [len(p[0]) for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_summary_against_python_floats() -> None:
    """max, mean and sum per tensor against math.fsum over the exact values (Python floats).

    The float32 tensor holds 2^24 and ones: a float32 sum would stay at 2^24, float64 does not.
    """
    g = torch.Generator().manual_seed(0)
    imp = {
        "a.weight": torch.rand(3, 4, generator=g, dtype=torch.float64),
        "a.bias": torch.tensor([2.0**24, 1.0, 1.0, 1.0]),
        "b": torch.rand(5, generator=g).square(),
    }
    got = summary(imp)
    assert list(got) == list(imp)
    for name, t in imp.items():
        values = t.flatten().tolist()
        assert got[name]["max"] == max(values)
        assert got[name]["sum"] == pytest.approx(math.fsum(values), rel=1e-15)
        assert got[name]["mean"] == pytest.approx(math.fsum(values) / len(values), rel=1e-15)
    assert got["a.bias"]["sum"] == 2.0**24 + 3


@pytest.mark.parametrize(
    "call",
    [
        lambda m, b: fisher(m, b, labels="model"),
        lambda m, b: fisher(m, b, labels="sampled"),
        lambda m, b: masq(m, b, scale="total"),
        lambda m, b: fisher_block_stats(m, b, "nope"),
        lambda m, b: fisher_block_stats(m, b, "0.weight", confidence=1.0),
        lambda m, b: fisher(m, b, loss=nn.functional.cross_entropy),
        lambda m, b: masq(m, b, loss=nn.functional.cross_entropy),
        lambda m, b: fisher(m, []),
        lambda m, b: fisher(m, b, buffer_bytes=0),
        lambda m, b: fisher_block_stats(m, b, "0.weight", buffer_bytes=-1),
        lambda m, b: fisher_block(m, b, "0.weight", buffer_bytes=True),
        lambda m, b: fisher_block(m, b, "nope"),
        lambda m, b: fisher_block(m, [], "0.weight"),
        lambda m, b: batches(torch.zeros(3), torch.zeros(2), 1),
        lambda m, b: batches(torch.zeros(3), torch.zeros(3), 0),
    ],
)
def test_user_errors_raise_config_error(call) -> None:
    model = MODELS["mlp-5-4-3"]()
    x, y = data("mlp-5-4-3")
    with pytest.raises(ConfigError) as info:
        call(model, batches(x, y, 5))
    assert "\n" not in str(info.value)


def test_unknown_tensor_lists_valid_names() -> None:
    model = MODELS["mlp-5-4-3"]()
    x, y = data("mlp-5-4-3")
    with pytest.raises(ConfigError, match=r"0\.weight, 0\.bias, 2\.weight, 2\.bias"):
        fisher_block_stats(model, batches(x, y, 5), "1.weight")
