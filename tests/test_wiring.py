"""Wiring of the protocol and the grid, each against an independent computation.

Comparing the stacked path with the separate one cannot see a bug both share; here the test
rebuilds what each stage should have seen (the data, the network state, the random stream)
from scratch: stream seeds from hashlib, task data selected from the dataset by hand, the
task-1 state trained by hand with masq.models.mlp and masq.training.train_task, importances
by masq.importance called directly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from masq import data, grid, importance
from masq import protocol as pr
from masq.config import RunConfig
from masq.data import Split
from masq.models import mlp
from masq.runid import run_id
from masq.store import Store
from masq.training import TrainConfig, train_task
from tests.synthetic import learnable_dataset

W = RunConfig(
    slt="D5-5",
    hidden=(16, 12),
    lr2=1e-3,
    lam=10.0,
    masq_batch=40,
    iters1=60,
    iters2=40,
    batch_size=25,
    eval_every=10,
    seed=3,
)
DATASET = learnable_dataset()


@pytest.fixture(autouse=True)
def learnable(monkeypatch: pytest.MonkeyPatch) -> None:
    """masq.data.load returns the learnable synthetic dataset whatever the name."""
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: DATASET)


def sha_seed(seed: int, name: str) -> int:
    """The stream seed written out: sha256("masq:<seed>:<name>")[:8] big-endian, 63 bits."""
    digest = hashlib.sha256(f"masq:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def xy_of(split: Split, classes: range) -> tuple[Tensor, Tensor]:
    """The samples of ``split`` with a label in ``classes``, pixels / 255, flattened."""
    x = torch.from_numpy(split.images.reshape(len(split.images), -1)).to(torch.float32) / 255.0
    y = torch.from_numpy(split.labels).to(torch.int64)
    keep = (y >= classes.start) & (y < classes.stop)
    return x[keep], y[keep]


TASK1, TASK2 = range(0, 5), range(5, 10)  # D5-5


def net_at(config: RunConfig, state: dict[str, Tensor]) -> nn.Sequential:
    model = mlp(config.hidden, init=config.init)
    model.load_state_dict(state)
    return model


def fresh_net(config: RunConfig) -> nn.Sequential:
    """The initial network of ``config``, seeded from the "init" stream by hand."""
    return mlp(config.hidden, init=config.init, seed=sha_seed(config.seed, "init"))


def train_by_hand(model: nn.Module, xy: tuple[Tensor, Tensor], config: RunConfig, phase: int,
                  sets: dict[str, Any] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Phase ``phase`` (1-based) of ``config`` on ``xy``, mini-batches from "d<phase>-batches"."""
    lr, iters = (config.lr1, config.iters1) if phase == 1 else (config.lr2, config.iters2)
    seed = sha_seed(config.seed, f"d{phase}-batches")
    train = TrainConfig(lr=lr, iters=iters, batch_size=config.batch_size,
                        eval_every=config.eval_every, seed=seed)  # fmt: skip
    return train_task(model, xy, train, eval_sets=sets)


def d1_by_hand(config: RunConfig) -> dict[str, Tensor]:
    model = fresh_net(config)
    train_by_hand(model, xy_of(DATASET.train, TASK1), config, 1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def importance_by_hand(config: RunConfig, state: dict[str, Tensor], xy: tuple[Tensor, Tensor],
                       labels_seed: int | None = None) -> dict[str, Tensor]:  # fmt: skip
    batches = importance.batches(xy[0], xy[1], config.masq_batch)
    model = net_at(config, state)
    if config.importance == "masq":
        return importance.masq(model, batches, scale=config.scale)
    generator = None
    if config.fisher_labels == "sample":
        seed = sha_seed(config.seed, "fisher-labels") if labels_seed is None else labels_seed
        generator = torch.Generator().manual_seed(seed)
    return importance.fisher(model, batches, labels=config.fisher_labels, generator=generator)


def equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def accuracy(config: RunConfig, state: dict[str, Tensor], xy: tuple[Tensor, Tensor]) -> float:
    with torch.no_grad():
        correct = int((net_at(config, state)(xy[0]).argmax(1) == xy[1]).sum())
    return correct / len(xy[1])


@pytest.fixture(scope="module")
def d1_state() -> dict[str, Tensor]:
    return d1_by_hand(W)


# ----------------------------------------------------------------------------- 1, 2: importance


@pytest.mark.parametrize(
    "changes",
    [{"importance": "masq"}, {"importance": "masq", "scale": "sum"}, {"importance": "fisher"}],
)
def test_task_1_importance_is_computed_on_task_1_training_data(
    d1_state: dict[str, Tensor], changes: dict[str, str]
) -> None:
    config = W.with_(**changes)
    tasks = pr.make_tasks(config)
    d1 = pr.train_first(config, tasks)
    assert equal(d1.state_dict, d1_state)
    imp, _ = pr.compute_importance(config, d1, tasks)
    expected = importance_by_hand(config, d1_state, xy_of(DATASET.train, TASK1))
    assert equal(imp, expected)
    on_d2 = importance_by_hand(config, d1_state, xy_of(DATASET.train, TASK2))
    assert not equal(on_d2, expected)  # the check can tell the two apart
    assert pr.run(config).importance_summary == pr.result.summarize(expected)


def test_task_1_importance_is_computed_at_the_d1_state(
    d1_state: dict[str, Tensor], tmp_path: Path
) -> None:
    tasks = pr.make_tasks(W)
    d1 = pr.train_first(W, tasks)
    imp, _ = pr.compute_importance(W, d1, tasks)
    train1 = xy_of(DATASET.train, TASK1)
    expected = importance_by_hand(W, d1_state, train1)
    at_init = importance_by_hand(W, fresh_net(W).state_dict(), train1)
    assert equal(imp, expected) and not equal(at_init, expected)
    # the grid's cached importance as well
    grid.execute([W], tmp_path, workers=1, threads=torch.get_num_threads(), progress=False)
    saved = Store(tmp_path).load_tensors(
        Store(tmp_path).importance / f"{grid.importance_key(W)}.safetensors"
    )
    assert saved is not None and equal(saved["importance"], expected)


# ----------------------------------------------------------------------------- 3: test sets


def test_curves_evaluate_on_the_test_sets(d1_state: dict[str, Tensor]) -> None:
    config = W.with_(eval_val=True, iters2=10)  # stopped mid-way: test and val differ
    result = pr.run(config)
    assert result.weights is not None
    tests = [xy_of(DATASET.test, TASK1), xy_of(DATASET.test, TASK2)]
    vals = [xy_of(DATASET.val, TASK1), xy_of(DATASET.val, TASK2)]
    differ = 0
    for phase, state in enumerate(result.weights):
        curve = result.curves[phase]
        for j, name in enumerate(("D1", "D2")):
            on_test = accuracy(config, state, tests[j])
            on_val = accuracy(config, state, vals[j])
            assert curve[name][-1] == on_test, (phase, name)
            assert curve["val:" + name][-1] == on_val, (phase, name)
            differ += on_test != on_val
    assert differ > 0  # test and validation accuracies differ, so a swap would show
    union = (torch.cat([tests[0][0], tests[1][0]]), torch.cat([tests[0][1], tests[1][1]]))
    assert result.last["D1∪D2"] == accuracy(config, result.weights[-1], union)
    # the stacked path evaluates on the same sets
    tasks = pr.make_tasks(config)
    d1 = pr.train_first(config, tasks)
    imp, _ = pr.compute_importance(config, d1, tasks)
    (stacked,) = pr.continue_stacked([config], d1, [imp], tasks, keep_weights=True)
    assert stacked.weights is not None
    for j, name in enumerate(("D1", "D2")):
        assert stacked.curves[1][name][-1] == accuracy(config, stacked.weights[-1], tests[j])
        assert stacked.curves[1]["val:" + name][-1] == accuracy(
            config, stacked.weights[-1], vals[j]
        )


# ----------------------------------------------------------------------------- 4: cache keys


def test_importance_cache_key_holds_scale_and_fisher_labels(
    d1_state: dict[str, Tensor], tmp_path: Path
) -> None:
    configs = [
        W.with_(importance="masq", scale="mean"),
        W.with_(importance="masq", scale="sum"),
        W.with_(importance="fisher", fisher_labels="true"),
        W.with_(importance="fisher", fisher_labels="sampled"),
    ]
    assert len({grid.importance_key(c) for c in configs}) == 4
    assert len({grid.d1_key(c) for c in configs}) == 1
    summary = grid.execute(
        configs, tmp_path, workers=1, stack=4, threads=torch.get_num_threads(), progress=False
    )
    assert summary.failed == {} and summary.importance_computed == 4
    store = Store(tmp_path)
    files = sorted(store.importance.glob("*.safetensors"))
    assert len(files) == 4
    train1 = xy_of(DATASET.train, TASK1)
    for path in files:
        saved = store.load_tensors(path)
        config = RunConfig.from_dict(saved["config"])
        assert path.stem == grid.importance_key(config)
        assert equal(saved["importance"], importance_by_hand(config, d1_state, train1))
    results = [store.read_record(run_id(c))["result"] for c in configs]
    summaries = [repr(r["importance_summary"]) for r in results]
    assert len(set(summaries)) == 4
    assert results[0]["curves"][1] != results[1]["curves"][1]  # scale changes the run


# ----------------------------------------------------------------------------- 5: label stream


def test_sampled_fisher_labels_come_from_the_fisher_labels_stream(
    d1_state: dict[str, Tensor],
) -> None:
    train1 = xy_of(DATASET.train, TASK1)
    for seed in (3, 4):
        config = W.with_(importance="fisher", fisher_labels="sampled", seed=seed)
        tasks = pr.make_tasks(config)
        d1 = pr.train_first(config, tasks)
        state = d1_state if seed == W.seed else d1_by_hand(config)
        assert equal(d1.state_dict, state)
        imp, _ = pr.compute_importance(config, d1, tasks)
        assert equal(imp, importance_by_hand(config, state, train1))
        wrong = importance_by_hand(config, state, train1, sha_seed(seed, "d1-batches"))
        assert not equal(imp, wrong)  # another stream gives other labels
    # task 2's pass (T > 2) draws from "fisher-labels-d2"
    config = W.with_(importance="fisher", fisher_labels="sampled")
    tasks = pr.make_tasks(config)
    imp2, _ = pr.importance_of(config, net_at(config, d1_state), tasks[1], 1, torch.device("cpu"))
    train2 = xy_of(DATASET.train, TASK2)
    expected2 = importance_by_hand(config, d1_state, train2, sha_seed(W.seed, "fisher-labels-d2"))
    assert equal(imp2, expected2)


# ----------------------------------------------------------------------------- 6: fresh Adam


def naive_adam_run(model: nn.Module, xy: tuple[Tensor, Tensor], config: TrainConfig) -> None:
    """config.iters Adam steps (fresh state) on mini-batches from concatenated seeded epochs."""
    generator = torch.Generator().manual_seed(config.seed)
    stream: list[int] = []
    while len(stream) < config.iters * config.batch_size:
        stream += torch.randperm(len(xy[1]), generator=generator).tolist()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, foreach=False)
    model.train()
    for it in range(config.iters):
        idx = torch.tensor(stream[it * config.batch_size : (it + 1) * config.batch_size])
        loss = nn.functional.cross_entropy(model(xy[0][idx]), xy[1][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_each_train_task_call_starts_a_fresh_adam(d1_state: dict[str, Tensor]) -> None:
    first = TrainConfig(lr=1e-2, iters=15, batch_size=25, eval_every=5, seed=1)
    second = TrainConfig(lr=1e-3, iters=15, batch_size=25, eval_every=5, seed=2)
    train1, train2 = xy_of(DATASET.train, TASK1), xy_of(DATASET.train, TASK2)
    model = net_at(W, d1_state)
    train_task(model, train1, first)
    middle = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_task(model, train2, second)
    fresh = net_at(W, middle)  # a new model object: no state can come with it
    train_task(fresh, train2, second)
    assert equal(model.state_dict(), fresh.state_dict())
    # and the same as a plain fresh Adam written out (fused or not: rounding only)
    naive = net_at(W, middle)
    naive_adam_run(naive, train2, second)
    for k, v in naive.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    carried = net_at(W, middle)  # what a carried-over Adam state would give
    optimizer = torch.optim.Adam(carried.parameters(), lr=1e-3)
    for p in carried.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad()
    assert not equal(carried.state_dict(), middle)


# ----------------------------------------------------------------------------- 7: eval mode


def dropout_net() -> tuple[nn.Sequential, nn.Sequential]:
    """A float64 net with dropout (in train mode) and its twin with the dropout removed."""
    generator = torch.Generator().manual_seed(0)
    a, b = nn.Linear(12, 8).double(), nn.Linear(8, 4).double()
    with torch.no_grad():
        for p in (*a.parameters(), *b.parameters()):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    model = nn.Sequential(a, nn.ReLU(), nn.Dropout(0.5), b).train()
    twin = nn.Sequential(a, nn.ReLU(), nn.Identity(), b)
    return model, twin


def naive_importance(model: nn.Module, x: Tensor, y: Tensor, batch: int, kind: str) -> dict:
    """MaSQ (mean over batches of squared batch-mean gradients) or the FIM (mean of squared
    per-sample gradients), one backward per batch or sample."""
    params = dict(model.named_parameters())
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    size = 1 if kind == "fisher" else batch
    chunks = [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]
    for xb, yb in chunks:
        loss = nn.functional.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(params, grads, strict=True):
            sums[k] += g.square()
    return {k: s / len(chunks) for k, s in sums.items()}


@pytest.mark.parametrize("kind", ["masq", "fisher"])
def test_importance_is_computed_in_eval_mode(kind: str) -> None:
    model, twin = dropout_net()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 12, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=generator)
    fn = importance.masq if kind == "masq" else importance.fisher
    torch.manual_seed(0)  # dropout in train mode would draw from the global RNG
    first = fn(model, importance.batches(x, y, 10))
    second = fn(model, importance.batches(x, y, 10))
    expected = naive_importance(twin, x, y, 10, kind)
    for k, v in expected.items():
        assert torch.equal(first[k], second[k])
        torch.testing.assert_close(first[k], v, rtol=1e-10, atol=1e-14)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    fn(model, importance.batches(x, y, 10))
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------- streams per phase


def test_grid_task_1_state_is_trained_with_the_config_streams(
    d1_state: dict[str, Tensor], tmp_path: Path
) -> None:
    configs = [W.with_(importance="none", lam=0.0), W.with_(importance="none", lam=0.0, lr2=1e-2)]
    grid.execute(
        configs, tmp_path, workers=1, stack=4, threads=torch.get_num_threads(), progress=False
    )
    store = Store(tmp_path)
    saved = store.load_tensors(store.d1 / f"{grid.d1_key(W)}.safetensors")
    assert saved is not None and equal(saved["state_dict"], d1_state)
    other = d1_by_hand(W.with_(seed=4))
    assert not equal(other, d1_state)
    # phase 2 of the stacked runs: "d2-batches", from the task-1 state, no penalty
    sets = {"D1": xy_of(DATASET.test, TASK1), "D2": xy_of(DATASET.test, TASK2)}
    for config in configs:
        model = net_at(config, d1_state)
        curve = train_by_hand(model, xy_of(DATASET.train, TASK2), config, 2, sets)
        stored = store.read_record(run_id(config))["result"]["curves"][1]
        assert stored["D1"] == curve["D1"] and stored["D2"] == curve["D2"]


def test_phase_t_uses_the_d_t_batches_stream() -> None:
    config = W.with_(slt="D4-3-3", importance="none", lam=0.0, hidden=(32,), iters2=20)
    result = pr.run(config)
    assert result.weights is not None
    model = fresh_net(config)
    for phase, classes in enumerate((range(0, 4), range(4, 7), range(7, 10)), start=1):
        train_by_hand(model, xy_of(DATASET.train, classes), config, phase)
        assert equal(model.state_dict(), result.weights[phase - 1]), phase
