"""The Fisher variants of van de Ven (2025) and their identities: predicted, batched, the
subset of n samples, and masq 0.1's label names mapping onto the new ones with unchanged ids."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from masq.config import FisherLabels, RunConfig
from masq.errors import ConfigError
from masq.importance import (
    MeasureContext,
    batches,
    diagonal,
    fisher,
    get_measure,
    masq,
    reference,
)
from masq.runid import id_dict, run_id


def net(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(dtype)


def data(n: int = 23, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def close(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = float(b[k].abs().max())
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("labels", ["predicted", "batched"])
def test_new_variants_match_the_naive_reference(
    labels: str, dtype: torch.dtype, rtol: float
) -> None:
    model, (x, y) = net(dtype), data(dtype=dtype)
    got = fisher(model, batches(x, y, 5), labels=labels)  # uneven: 5+5+5+5+3
    want = reference.fisher(model, batches(x, y, 5), labels=labels)
    assert all(t.dtype == dtype for t in got.values())
    close(got, want, rtol)


def test_predicted_is_the_empirical_fisher_of_the_argmax_labels() -> None:
    model, (x, _) = net(), data()
    with torch.no_grad():
        argmax = model(x).argmax(1)
    got = fisher(model, batches(x, argmax * 0, 7), labels="predicted")  # y is not read
    want = fisher(model, batches(x, argmax, 7), labels="empirical")
    close(got, want, 1e-12)


@pytest.mark.parametrize("b", [1, 4, 23])
def test_batched_is_masq_mean_at_b(b: int) -> None:
    """The identity the docstring states: batched at b = MaSQ (scale "mean") at B_MaSQ = b."""
    model, (x, y) = net(), data()
    got = fisher(model, batches(x, y, b), labels="batched")
    want = masq(model, batches(x, y, b), scale="mean")
    for k in got:
        assert torch.equal(got[k], want[k])


def test_batched_at_one_sample_is_empirical() -> None:
    model, (x, y) = net(), data()
    close(
        fisher(model, batches(x, y, 1), labels="batched"),
        fisher(model, batches(x, y, 5), labels="empirical"),
        1e-10,
    )


def test_exact_is_the_mean_of_sampled_draws() -> None:
    """sample is an unbiased one-draw estimate of exact: the mean over many seeds converges."""
    model, (x, y) = net(), data(n=6)
    exact = fisher(model, batches(x, y, 6), labels="exact")
    draws = [
        fisher(model, batches(x, y, 6), labels="sample", generator=torch.Generator().manual_seed(s))
        for s in range(400)
    ]
    for k in exact:
        mean = torch.stack([d[k] for d in draws]).mean(0)
        torch.testing.assert_close(mean, exact[k], rtol=0.15, atol=0.05 * float(exact[k].max()))


def context(n: int, labels: str = "empirical", seed: int = 3) -> MeasureContext:
    settings = {"fisher_labels": FisherLabels(labels), "fisher_samples": n}
    return MeasureContext(settings, 4, torch.Generator().manual_seed(seed))


def test_fisher_samples_takes_a_seeded_subset() -> None:
    model, (x, y) = net(), data()
    measure = get_measure("fisher")
    got = measure.compute(model, (x, y), context(9))
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:9].sort().values
    close(got, fisher(model, batches(x[index], y[index], 4)), 1e-12)
    again = measure.compute(model, (x, y), context(9))
    assert all(torch.equal(got[k], again[k]) for k in got)
    other = measure.compute(model, (x, y), context(9, seed=4))
    assert any(not torch.equal(got[k], other[k]) for k in got)


def test_fisher_samples_zero_or_at_least_n_is_every_sample() -> None:
    model, (x, y) = net(), data()
    full = fisher(model, batches(x, y, 4))
    for n in (0, 23, 100):
        close(get_measure("fisher").compute(model, (x, y), context(n)), full, 1e-12)


def test_subset_leaves_the_label_draws_alone_without_a_subset() -> None:
    """n = 0 makes no draw: sample-label runs of masq 0.1 keep their numbers."""
    model, (x, y) = net(), data()
    got = get_measure("fisher").compute(model, (x, y), context(0, "sample"))
    want = fisher(
        model, batches(x, y, 4), labels="sample", generator=torch.Generator().manual_seed(3)
    )
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_subset_refuses_bad_sizes() -> None:
    x, y = data()
    with pytest.raises(ConfigError, match="fisher_samples"):
        diagonal.subset(x, y, -1, None)
    with pytest.raises(ConfigError, match="generator"):
        diagonal.subset(x, y, 3, None)


# ---------------------------------------------------------------- names and ids of masq 0.1


@pytest.mark.parametrize(("old", "new"), [("true", "empirical"), ("sampled", "sample")])
def test_old_label_names_map_onto_the_new(old: str, new: str) -> None:
    assert FisherLabels(old) is FisherLabels(new)
    assert RunConfig(fisher_labels=old).fisher_labels is FisherLabels(new)
    assert RunConfig.from_dict({"fisher_labels": old}).fisher_labels is FisherLabels(new)


# Run ids computed by masq before the rename (the same configs, fisher_labels "true",
# "sampled", "exact"), written down so that a change of the id encoding fails here.
OLD_IDS = {"empirical": "402ac5c0b977b72ce9de", "sample": "2c9f51bc7f0b8a429077",
           "exact": "2c468917787e132ea61a"}  # fmt: skip


@pytest.mark.parametrize("labels", list(OLD_IDS))
def test_run_ids_of_old_records_are_unchanged(labels: str) -> None:
    config = RunConfig(importance="fisher", fisher_labels=labels, slt="D9-1", lam=10.0)
    assert run_id(config) == OLD_IDS[labels]
    assert id_dict(config)["fisher_labels"] == {"empirical": "true", "sample": "sampled"}.get(
        labels, labels
    )


def test_new_fields_at_their_defaults_leave_the_id_alone() -> None:
    config = RunConfig(importance="fisher", fisher_labels="exact", slt="D9-1", lam=10.0)
    assert "fisher_samples" not in id_dict(config) and "si_damping" not in id_dict(config)
    sub = dataclasses.replace(config, fisher_samples=500)
    assert run_id(sub) != run_id(config)


def test_labels_of_the_variants() -> None:
    label = get_measure("fisher").text
    assert label({"fisher_labels": "true"}) == "FIM"
    assert label({"fisher_labels": "exact", "fisher_samples": 500}) == "FIM (exact, n=500)"
    assert label({"fisher_labels": "batched", "masq_batch": 128}) == "FIM (batched, b=128)"
    assert label({"fisher_labels": "predicted"}) == "FIM (predicted)"
