"""K-FAC and per-layer Fisher blocks (masq.importance.kfac) and their penalties
(masq.consolidation.structured) against the naive twins (masq.importance.reference.kfac), and
the identities between them: explicit Kronecker products and blocks, diagonals, the
single-layer softmax case where K-FAC is exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from masq.consolidation import FactorAnchor as Anchor
from masq.consolidation import factor_anchor, penalty_for
from masq.consolidation.structured import KFACPenalty, LayerFisherPenalty
from masq.errors import ConfigError
from masq.importance import MeasureContext, batches, fisher, get_measure, reference
from masq.importance.diagonal import subset
from masq.importance.kfac import kfac_factors, layer_fisher_factors

LABELS = ["empirical", "sample", "exact", "predicted"]
DTYPES = [torch.float64, torch.float32]
MODULES = ["0", "2"]
# float32 fast code against the float64 reference: rounding of a tiny net over 7 samples is a
# few 1e-7 of a tensor's maximum; 1e-5 leaves a margin and still catches a wrong factor.
Measure = Callable[..., dict[str, Tensor]]
Kind = type[KFACPenalty] | type[LayerFisherPenalty]
# labels="sample" in float64 only: float32 and float64 softmaxes may draw other labels from one
# seed (as in test_importance.py)
CASES = [(d, lab) for d in DTYPES for lab in LABELS if d == torch.float64 or lab != "sample"]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def net(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    """Linear(5, 4) -> ReLU -> Linear(4, 3) with N(0, 0.6²) parameters."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def data(dtype: torch.dtype = torch.float64, n: int = 7) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def close(got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    """got (in dtype) against the float64 want, relative to want's largest entry."""
    scale = float(want.abs().max()) or 1.0
    tol = RTOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale)


def explicit(u: Tensor, v: Tensor) -> Tensor:
    """Σ_n Σ_t kron(u_nt, v_n) kron(u_nt, v_n)ᵀ in float64 (U [N, T, out], V [N, cols]): the
    P x P block of the rows."""
    k = (u.double()[:, :, :, None] * v.double()[:, None, None, :]).flatten(2).flatten(0, 1)
    return k.T @ k


def shifted(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """θ* = θ + N(0, 0.3²) noise, detached."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for k, p in model.named_parameters()
    }


# ------------------------------------------------------------------------------ factors


@pytest.mark.parametrize(("dtype", "labels"), CASES)
def test_kfac_factors_match_reference(dtype: torch.dtype, labels: str) -> None:
    """Fast A, G (batches 3, 3, 1) against one backward per sample and label term."""
    model = net(dtype)
    x, y = data(dtype)
    got = kfac_factors(model, batches(x, y, 3), labels=labels, generator=gen())
    want = reference.kfac_factors(model, batches(x, y, 3), labels=labels, generator=gen())
    assert sorted(got) == ["0.A", "0.G", "2.A", "2.G"] == sorted(want)
    assert got["0.A"].shape == (6, 6) and got["2.G"].shape == (3, 3)
    for k in got:
        assert got[k].dtype == dtype
        close(got[k], want[k], dtype)


@pytest.mark.parametrize(("dtype", "labels"), CASES)
def test_layer_blocks_match_the_explicit_reference_block(dtype: torch.dtype, labels: str) -> None:
    model = net(dtype)
    x, y = data(dtype)
    got = layer_fisher_factors(model, batches(x, y, 3), labels=labels, generator=gen())
    terms = 3 if labels == "exact" else 1
    assert got["0.U"].shape == (7, terms, 4) and got["0.V"].shape == (7, 6)
    assert got["2.U"].dtype == dtype and got["2.V"].shape == (7, 5)
    for m in MODULES:
        want = reference.layer_fisher_block(
            model, batches(x, y, 3), m, labels=labels, generator=gen()
        )
        close(explicit(got[f"{m}.U"], got[f"{m}.V"]), want, dtype)


def test_factors_do_not_depend_on_the_batch_split() -> None:
    model = net()
    x, y = data()
    one = kfac_factors(model, batches(x, y, 7))
    for size in (1, 2, 3):
        other = kfac_factors(model, batches(x, y, size))
        for k in one:
            close(other[k], one[k], torch.float64)


def test_the_block_diagonal_is_the_diagonal_fisher() -> None:
    """diag of the exact block == masq.importance.fisher's diagonal of W and b (empirical and
    exact labels), while K-FAC's diagonal outer(diag G, diag A) differs in general."""
    model = net()
    x, y = data()
    for labels in ("empirical", "exact"):
        rows = layer_fisher_factors(model, batches(x, y, 3), labels=labels)
        diag = fisher(model, batches(x, y, 3), labels=labels)
        factors = kfac_factors(model, batches(x, y, 3), labels=labels)
        for m in MODULES:
            block = explicit(rows[f"{m}.U"], rows[f"{m}.V"]).diagonal()
            want = torch.cat([diag[f"{m}.weight"], diag[f"{m}.bias"][:, None]], 1).flatten()
            close(block, want, torch.float64)
            g, a = factors[f"{m}.G"], factors[f"{m}.A"]
            kron_diag = torch.outer(g.diagonal(), a.diagonal()).flatten()
            close(kron_diag, torch.kron(g, a).diagonal(), torch.float64)
            assert not torch.allclose(kron_diag, block, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kfac_is_exact_for_one_softmax_layer_at_uniform_predictions(dtype: torch.dtype) -> None:
    """nn.Linear(d, C) with zero weights: p = 1/C for every sample, so E_c[δδᵀ] = diag(p) − ppᵀ
    is the same for all samples and the block E[δδᵀ ⊗ āāᵀ] factors exactly into G ⊗ A."""
    model = nn.Linear(5, 3).to(dtype)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x, y = data(dtype)
    factors = kfac_factors(model, batches(x, y, 3), labels="exact")
    assert sorted(factors) == ["A", "G"]
    want = reference.layer_fisher_block(model, batches(x, y, 3), "", labels="exact")
    g, a = factors["G"].double(), factors["A"].double()
    close(torch.kron(g, a), want, dtype)
    close(torch.outer(g.diagonal(), a.diagonal()).flatten(), want.diagonal(), dtype)
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    close(g, torch.diag(p) - torch.outer(p, p), dtype)
    rows = layer_fisher_factors(model, batches(x, y, 3), labels="exact")
    close(explicit(rows["U"], rows["V"]), want, dtype)


@pytest.mark.parametrize("measure", [kfac_factors, layer_fisher_factors])
@pytest.mark.parametrize("labels", ["empirical", "exact", "sample"])
def test_outputs_restrict_to_the_task_units(measure: Measure, labels: str) -> None:
    """Task-incremental heads: logits model(x)[U], labels their positions in U."""
    model = net()
    x, y = data()
    y = torch.where(y == 1, torch.tensor(2), y)  # labels among the units 0 and 2
    units = [0, 2]
    got = measure(model, batches(x, y, 3), labels=labels, generator=gen(), outputs=units)
    if measure is kfac_factors:
        want = reference.kfac_factors(
            model, batches(x, y, 3), labels=labels, generator=gen(), outputs=units
        )
        for k in got:
            close(got[k], want[k], torch.float64)
        assert got["2.G"][1].abs().max() == 0  # the masked unit 1 gets no gradient
        return
    for m in MODULES:
        want = reference.layer_fisher_block(
            model, batches(x, y, 3), m, labels=labels, generator=gen(), outputs=units
        )
        close(explicit(got[f"{m}.U"], got[f"{m}.V"]), want, torch.float64)


def test_a_frozen_bias_leaves_the_one_out_of_a() -> None:
    model = net()
    model[0].bias.requires_grad_(False)
    x, y = data()
    got = kfac_factors(model, batches(x, y, 3), labels="exact")
    want = reference.kfac_factors(model, batches(x, y, 3), labels="exact")
    assert got["0.A"].shape == (5, 5) and got["2.A"].shape == (5, 5)
    for k in got:
        close(got[k], want[k], torch.float64)
    rows = layer_fisher_factors(model, batches(x, y, 3), labels="exact")
    block = reference.layer_fisher_block(model, batches(x, y, 3), "0", labels="exact")
    close(explicit(rows["0.U"], rows["0.V"]), block, torch.float64)


@pytest.mark.parametrize("measure", [kfac_factors, layer_fisher_factors])
def test_the_model_is_handed_back_untouched(measure: Measure) -> None:
    model = net().train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    x, y = data()
    measure(model, batches(x, y, 3), labels="exact", device="cpu")
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("measure", [kfac_factors, layer_fisher_factors])
def test_refusals_are_one_line_config_errors(measure: Measure) -> None:
    x, y = data()
    with pytest.raises(ConfigError, match=r"labels='batched'.*empirical, sample, exact, predicted"):
        measure(net(), batches(x, y, 3), labels="batched")
    with pytest.raises(ConfigError, match="needs generator"):
        measure(net(), batches(x, y, 3), labels="sample")
    with pytest.raises(ConfigError, match="batches yielded nothing"):
        measure(net(), iter([]))
    with pytest.raises(ConfigError, match="has labels from 5 to"):
        measure(net(), batches(x, y + 5, 3), labels="empirical")
    normed = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    conv = nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3))
    for model in (normed, conv.double()):
        with pytest.raises(ConfigError, match=r"cover nn\.Linear layers only") as info:
            measure(model, batches(x, y, 3))
        assert "\n" not in str(info.value)
    # a layer on a [B, 1, 5] input: its rows are not samples
    seq = nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Linear(5, 3), nn.Flatten()).double()
    with pytest.raises(ConfigError, match="once per forward on \\[B, in\\]"):
        measure(seq, batches(x, y, 3))


# ------------------------------------------------------------------------------ penalties


def anchors_for(model: nn.Module, measure: Measure, count: int = 2) -> list[Anchor]:
    """``count`` anchors at shifted parameters with factors of ``measure`` on other data."""
    out = []
    for i in range(count):
        x, y = data(next(model.parameters()).dtype, n=7 + i)
        out.append(Anchor(shifted(model, i), measure(model, batches(x, y, 3), labels="exact")))
    return out


PENALTIES = [(KFACPenalty, kfac_factors), (LayerFisherPenalty, layer_fisher_factors)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kfac_penalty_is_the_explicit_kronecker_product(dtype: torch.dtype) -> None:
    model = net(dtype)
    anchors = anchors_for(model, kfac_factors)
    got = KFACPenalty(model, anchors, 2.5).value(dict(model.named_parameters()))
    want = sum(reference.kfac_penalty(model, a.params, a.importance, 2.5).detach() for a in anchors)
    assert got.dtype == dtype
    close(got.detach(), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_penalty_is_the_explicit_reference_block(dtype: torch.dtype) -> None:
    model = net(dtype)
    x, y = data(dtype)
    stars = shifted(model, 5)
    rows = layer_fisher_factors(model, batches(x, y, 3), labels="exact")
    got = LayerFisherPenalty(model, [Anchor(stars, rows)], 0.7).value(
        dict(model.named_parameters())
    )
    blocks = {
        m: reference.layer_fisher_block(model, batches(x, y, 3), m, labels="exact") for m in MODULES
    }
    want = reference.layer_block_penalty(model, stars, blocks, 0.7).detach()
    close(got.detach(), want, dtype)


@pytest.mark.parametrize(("kind", "measure"), PENALTIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_grad_is_autograd_of_the_value(
    dtype: torch.dtype, kind: Kind, measure: Measure
) -> None:
    """add_grad adds λ ∇P to .grad (a zero one where None), equal to autograd of value;
    P = 0 with ∇P = 0 at the anchor."""
    model = net(dtype)
    params = dict(model.named_parameters())
    pen = kind(model, anchors_for(model, measure), 3.0)
    pen.value(params).backward()
    auto = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    pen(model)
    auto["0.weight"] += 1
    for k, p in params.items():
        close(p.grad, auto[k].double(), dtype)
    at = [Anchor({k: p.detach().clone() for k, p in params.items()}, a.importance)
          for a in anchors_for(model, measure, 1)]  # fmt: skip
    model.zero_grad(set_to_none=True)
    zero = kind(model, at, 2.0)
    assert float(zero.value(params).detach()) == 0.0
    zero.add_grad(params)
    assert all(float(p.grad.abs().max()) == 0.0 for p in params.values())


@pytest.mark.parametrize(("kind", "measure"), PENALTIES)
def test_penalty_checks_are_one_line_config_errors(kind: Kind, measure: Measure) -> None:
    model = net()
    (a,) = anchors_for(model, measure, 1)
    first, second = sorted(a.importance)[:2]  # "0.A", "0.G" or "0.U", "0.V"
    cases = {
        "finite number >= 0": (a.importance, -1.0),
        "has no factor": ({k: v for k, v in a.importance.items() if k != first}, 1.0),
        "has shape": ({**a.importance, second: a.importance[second][:, :2]}, 1.0),
        "NaN/inf": ({**a.importance, first: a.importance[first] * float("nan")}, 1.0),
        "factors of no nn.Linear": ({**a.importance, "9.A": a.importance[first]}, 1.0),
    }
    for match, (imp, lam) in cases.items():
        with pytest.raises(ConfigError, match=match) as info:
            kind(model, [Anchor(a.params, imp)], lam)
        assert "\n" not in str(info.value)
    normed = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    with pytest.raises(ConfigError, match=r"cover nn\.Linear layers only"):
        kind(normed, [Anchor(shifted(normed, 0), a.importance)], 1.0)


# ------------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "measure", "kind", "label"),
    [
        ("kfac", kfac_factors, KFACPenalty, "K-FAC (exact)"),
        ("fisher-blocks", layer_fisher_factors, LayerFisherPenalty, "FIM blocks (exact)"),
    ],
)
def test_the_measures_through_the_registry(
    name: str, measure: Measure, kind: Kind, label: str
) -> None:
    model = net()
    x, y = data()
    entry = get_measure(name)
    assert entry.kind == name and entry.fields == ("fisher_labels", "fisher_samples")
    settings = {"fisher_labels": "exact", "fisher_samples": 0}
    assert entry.text(settings) == label
    assert entry.text({"fisher_labels": "sample", "fisher_samples": 4}).endswith("(sample, n=4)")
    ctx = MeasureContext(
        settings=settings, batch_size=3, generator=torch.Generator().manual_seed(0)
    )
    got = entry.compute(model, (x, y), ctx)
    want = measure(model, batches(x, y, 3), labels="exact")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in got)
    sub = {"fisher_labels": "empirical", "fisher_samples": 4}
    ctx = MeasureContext(settings=sub, batch_size=3, generator=torch.Generator().manual_seed(0))
    xs, ys = subset(x, y, 4, torch.Generator().manual_seed(0))
    got = entry.compute(model, (x, y), ctx)
    want = measure(model, batches(xs, ys, 3), labels="empirical")
    assert all(torch.equal(got[k], want[k]) for k in got)
    pen = penalty_for(name, model, [factor_anchor(model, got)], 1.0)
    assert isinstance(pen, kind)
    with pytest.raises(ConfigError, match="labels='batched'"):
        entry.compute(
            model, (x, y), MeasureContext(settings={**settings, "fisher_labels": "batched"})
        )
