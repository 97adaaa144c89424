from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from masq.errors import ConfigError
from masq.models import mlp
from masq.training import (
    TrainConfig,
    accuracies,
    adam_moments,
    eval_counts,
    eval_iterations,
    load_adam_moments,
    make_adam,
    minibatch_indices,
    train_task,
)


def blobs(n: int, seed: int, classes: int = 3, features: int = 784) -> tuple[Tensor, Tensor]:
    """A learnable task: ``classes`` Gaussian blobs around fixed random centres."""
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centres[y] + 0.5 * torch.randn(n, features, generator=g)
    return x, y


@pytest.mark.parametrize(("n", "batch", "iters"), [(10, 3, 17), (12, 4, 9), (7, 10, 5), (5, 5, 4)])
def test_minibatches_cover_every_index_once_per_epoch(n: int, batch: int, iters: int) -> None:
    batches = list(minibatch_indices(n, batch, iters, torch.Generator().manual_seed(0)))
    assert len(batches) == iters
    assert all(b.shape == (batch,) and b.dtype == torch.int64 for b in batches)
    stream = torch.cat(batches)
    for start in range(0, len(stream) - n + 1, n):  # every complete epoch is a permutation
        assert sorted(stream[start : start + n].tolist()) == list(range(n))
    tail = stream[len(stream) - len(stream) % n :].tolist()
    assert len(set(tail)) == len(tail)  # the started epoch repeats nothing


def test_minibatches_reshuffle_each_epoch_and_are_seeded() -> None:
    def stream(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat(list(minibatch_indices(20, 5, 8, gen))).tolist()

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)
    first = stream(1)
    assert first[:20] != first[20:]  # two epochs, two permutations


def test_minibatch_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        list(minibatch_indices(0, 5, 1, torch.Generator()))
    with pytest.raises(ConfigError):
        list(minibatch_indices(5, 0, 1, torch.Generator()))


def test_eval_iterations() -> None:
    assert eval_iterations(10, 5) == [0, 5, 10]
    assert eval_iterations(12, 5) == [0, 5, 10, 12]
    assert eval_iterations(3, 1) == [0, 1, 2, 3]
    assert eval_iterations(3, 50) == [0, 3]


def test_eval_counts_match_a_direct_count_and_restore_the_mode() -> None:
    model = mlp((8,), seed=0)
    x, y = blobs(37, seed=1, classes=10)
    expected = int((model(x).argmax(1) == y).sum())
    model.train()
    assert eval_counts(model, {"a": (x, y)}, batch_size=10) == {"a": (expected, 37)}
    assert model.training
    model.eval()
    eval_counts(model, {"a": (x, y)})
    assert not model.training


def test_union_accuracy_comes_from_the_counts() -> None:
    model = mlp((8,), seed=0)
    a, b = blobs(30, seed=1, classes=10), blobs(50, seed=2, classes=10)
    counts = eval_counts(model, {"A": a, "B": b})
    acc = accuracies(counts, {"A∪B": ("A", "B")})
    union = (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    ((correct, total),) = eval_counts(model, {"U": union}).values()
    assert acc["A∪B"] == correct / total
    assert acc["A"] == counts["A"][0] / 30
    with pytest.raises(ConfigError, match="unknown sets"):
        accuracies(counts, {"X": ("A", "C")})
    assert accuracies({"E": (0, 0)}, {})["E"] != accuracies({"E": (0, 0)}, {})["E"]  # NaN


def test_training_reduces_the_loss_and_learns() -> None:
    x, y = blobs(300, seed=0)
    xt, yt = blobs(150, seed=1)
    model = mlp((32,), classes=3, seed=0)
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    curve = train_task(
        model,
        (x, y),
        TrainConfig(lr=1e-3, iters=60, batch_size=20, eval_every=20, seed=0),
        eval_sets={"test": (xt, yt)},
    )
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.5 * before
    assert curve["iteration"] == [0, 20, 40, 60]
    assert curve["test"][-1] > 0.95 > curve["test"][0]


def test_eval_every_one_and_unions_in_the_curve() -> None:
    x, y = blobs(40, seed=0)
    curve = train_task(
        mlp((4,), classes=3),
        (x, y),
        TrainConfig(iters=5, batch_size=8, eval_every=1),
        eval_sets={"A": (x[:20], y[:20]), "B": (x[20:], y[20:])},
        unions={"A∪B": ("A", "B")},
    )
    assert curve["iteration"] == [0, 1, 2, 3, 4, 5]
    assert set(curve) == {"iteration", "A", "B", "A∪B"}
    assert all(len(v) == 6 for v in curve.values())
    for i in range(6):
        assert curve["A∪B"][i] == pytest.approx((curve["A"][i] + curve["B"][i]) / 2)


def test_training_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    x, y = blobs(100, seed=0)
    config = TrainConfig(lr=1e-2, iters=25, batch_size=10, seed=5)
    state = torch.random.get_rng_state()
    a, b = mlp((16,), classes=3, seed=1), mlp((16,), classes=3, seed=1)
    train_task(a, (x, y), config)
    train_task(b, (x, y), config)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_penalty_is_added_to_the_loss() -> None:
    x, y = blobs(100, seed=0)
    config = TrainConfig(lr=1e-2, iters=20, batch_size=10)
    free, held = mlp((16,), classes=3, seed=1), mlp((16,), classes=3, seed=1)
    start = [p.detach().clone() for p in held.parameters()]

    def pull(m: torch.nn.Module) -> Tensor:  # a strong pull back to the start
        return 1e6 * sum(((p - s) ** 2).sum() for p, s in zip(m.parameters(), start, strict=True))

    train_task(free, (x, y), config)
    train_task(held, (x, y), config, penalty=pull)
    moved_free = sum(
        (p - s).abs().sum().item() for p, s in zip(free.parameters(), start, strict=True)
    )
    moved_held = sum(
        (p - s).abs().sum().item() for p, s in zip(held.parameters(), start, strict=True)
    )
    assert moved_held < 0.5 * moved_free


def test_masked_training_equals_an_independent_loop_on_the_restricted_head() -> None:
    """units U: CE(logits + head_bias(U), y) == CE(logits[:, U], position of y in U), the
    other units' rows never move; eval_units argmax over logits[:, U] only."""
    units = (1, 4, 5)
    xb, yb = blobs(120, seed=0, classes=3, features=20)
    y = torch.as_tensor(units)[yb]  # labels are units of the full 6-unit head
    x_eval, y_eval = xb[:50], y[:50]
    config = TrainConfig(lr=1e-2, iters=23, batch_size=16, eval_every=10, seed=4)
    model, ref = (
        mlp((8,), in_features=20, classes=6, seed=2),
        mlp((8,), in_features=20, classes=6, seed=2),
    )
    curve = train_task(
        model,
        (xb, y),
        config,
        eval_sets={"E": (x_eval, y_eval)},
        units=units,
        eval_units={"E": units},
    )
    # the reference: Adam on the 3-way problem of the restricted logits, same mini-batches
    index = torch.as_tensor(units)
    adam = torch.optim.Adam(ref.parameters(), lr=config.lr)
    expected = []
    generator = torch.Generator().manual_seed(config.seed)
    batches = minibatch_indices(120, config.batch_size, config.iters, generator)
    for it, idx in enumerate(batches, start=1):
        loss = F.cross_entropy(ref(xb[idx])[:, index], yb[idx])
        adam.zero_grad()
        loss.backward()
        adam.step()
        if it in (10, 20, 23):
            with torch.no_grad():
                hit = index[ref(x_eval)[:, index].argmax(1)] == y_eval
            expected.append(hit.float().mean().item())
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert curve["iteration"] == [0, 10, 20, 23]
    assert curve["E"][1:] == pytest.approx(expected, abs=1.01 / 50)
    start = mlp((8,), in_features=20, classes=6, seed=2)
    others = [0, 2, 3]
    assert torch.equal(model[2].weight[others], start[2].weight[others])
    assert torch.equal(model[2].bias[others], start[2].bias[others])


def test_units_over_the_whole_head_are_bit_identical_to_none() -> None:
    """A mask of every unit adds 0 to finite logits: the same numbers, bit for bit."""
    x, y = blobs(60, seed=0)
    config = TrainConfig(lr=1e-2, iters=12, batch_size=10, eval_every=5, seed=1)
    plain, masked = mlp((8,), classes=3, seed=0), mlp((8,), classes=3, seed=0)
    sets = {"A": (x[:30], y[:30])}
    a = train_task(plain, (x, y), config, eval_sets=sets)
    b = train_task(
        masked, (x, y), config, eval_sets=sets, units=(0, 1, 2), eval_units={"A": (0, 1, 2)}
    )
    assert a == b
    for p, q in zip(plain.parameters(), masked.parameters(), strict=True):
        assert torch.equal(p, q)


def test_eval_counts_masks_only_the_named_sets() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    x, y = torch.randn(33, 5), torch.randint(0, 4, (33,))
    logits = model(x).detach()
    counts = eval_counts(model, {"A": (x, y), "B": (x, y)}, batch_size=7, units={"A": (0, 3)})
    kept = torch.tensor([0, 3])
    assert counts["A"] == (int((kept[logits[:, kept].argmax(1)] == y).sum()), 33)
    assert counts["B"] == (int((logits.argmax(1) == y).sum()), 33)
    with pytest.raises(ConfigError, match="units"):
        eval_counts(model, {"A": (x, y)}, units={"A": (0, 4)})


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = blobs(30, seed=0)
    train_task(
        mlp((4,), classes=3),
        (x, y),
        TrainConfig(iters=3, batch_size=10, eval_every=1),
        eval_sets={"A": (x, y)},
        progress=True,
        desc="demo",
    )
    captured = capsys.readouterr()
    assert "demo" in captured.err and captured.out == ""


@pytest.mark.parametrize(
    "bad", [{"lr": 0.0}, {"lr": -1e-3}, {"iters": 0}, {"batch_size": 0}, {"eval_every": 0}]
)
def test_bad_train_config(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**bad)


# ----------------------------------------------------------------------------- Adam's state


def _adam_reference(
    model: torch.nn.Module, x: Tensor, y: Tensor, phases: list[TrainConfig]
) -> None:
    """One torch.optim.Adam (for-each kernel) stepped through every phase, its learning rate
    set per phase, the mini-batches of each phase's seed: the meaning of adam_state keep."""
    adam = torch.optim.Adam(model.parameters(), lr=phases[0].lr, foreach=False)
    for config in phases:
        for group in adam.param_groups:
            group["lr"] = config.lr
        generator = torch.Generator().manual_seed(config.seed)
        for idx in minibatch_indices(x.shape[0], config.batch_size, config.iters, generator):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            adam.zero_grad()
            loss.backward()
            adam.step()


def test_a_carried_optimizer_continues_adam_across_calls() -> None:
    x, y = blobs(90, seed=1, classes=3, features=20)
    phases = [
        TrainConfig(lr=1e-2, iters=17, batch_size=16, eval_every=100, seed=5),
        TrainConfig(lr=3e-3, iters=11, batch_size=16, eval_every=100, seed=6),
    ]
    model, ref, fresh = (mlp((8,), in_features=20, classes=3, seed=2) for _ in range(3))
    adam = make_adam(model.parameters(), phases[0].lr)
    for config in phases:
        train_task(model, (x, y), config, optimizer=adam)
    assert adam.param_groups[0]["lr"] == phases[1].lr
    _adam_reference(ref, x, y, phases)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for config in phases:  # a fresh Adam per call (the default) is another trajectory
        train_task(fresh, (x, y), config)
    assert not torch.allclose(fresh[0].weight, model[0].weight, atol=1e-4)


def test_adam_moments_round_trip_into_a_new_optimizer() -> None:
    """The moments read after one phase, loaded into a new Adam over a copy of the network,
    continue exactly as the original optimizer does (the d1 cache of adam_state keep)."""
    x, y = blobs(90, seed=1, classes=3, features=20)
    first = TrainConfig(lr=1e-2, iters=13, batch_size=16, eval_every=100, seed=5)
    second = TrainConfig(lr=3e-3, iters=9, batch_size=16, eval_every=100, seed=6)
    model = mlp((8,), in_features=20, classes=3, seed=2)
    adam = make_adam(model.parameters(), first.lr)
    train_task(model, (x, y), first, optimizer=adam)
    moments = adam_moments(adam, model)
    assert moments.step == first.iters
    assert set(moments.exp_avg) == {n for n, _ in model.named_parameters()}
    copy = mlp((8,), in_features=20, classes=3, seed=0)
    copy.load_state_dict(model.state_dict())
    again = make_adam(copy.parameters(), second.lr)
    load_adam_moments(again, copy, moments)
    train_task(model, (x, y), second, optimizer=adam)
    train_task(copy, (x, y), second, optimizer=again)
    for (name, p), q in zip(model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert adam_moments(again, copy).step == first.iters + second.iters


def test_adam_moments_refuse_another_architecture() -> None:
    x, y = blobs(40, seed=1, classes=3, features=20)
    model = mlp((8,), in_features=20, classes=3, seed=2)
    adam = make_adam(model.parameters(), 1e-2)
    with pytest.raises(ConfigError, match="no Adam state"):
        adam_moments(adam, model)
    train_task(model, (x, y), TrainConfig(lr=1e-2, iters=3, batch_size=8, seed=1), optimizer=adam)
    moments = adam_moments(adam, model)
    other = mlp((9,), in_features=20, classes=3, seed=2)
    with pytest.raises(ConfigError, match="shape"):
        load_adam_moments(make_adam(other.parameters(), 1e-2), other, moments)
    deeper = mlp((8, 8), in_features=20, classes=3, seed=2)
    with pytest.raises(ConfigError, match="architecture"):
        load_adam_moments(make_adam(deeper.parameters(), 1e-2), deeper, moments)
