from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masq.defaults import PAPER_SLTS
from masq.errors import ConfigError
from masq.slt import parse_spec
from masq.tasks import make, union_test
from tests.synthetic import synthetic_dataset

DATA = synthetic_dataset()
PARTS = ("train", "val", "test")


def test_paper_specs_match_the_paper() -> None:
    assert parse_spec("D5-5").task_classes == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    assert parse_spec("D9-1").task_classes == (tuple(range(9)), (9,))
    dp = parse_spec("DP10-10")
    assert dp.permuted and dp.task_classes == (tuple(range(10)), tuple(range(10)))
    assert set(PAPER_SLTS) == {"D5-5", "D9-1", "DP10-10"}


def test_explicit_class_order() -> None:
    spec = parse_spec("D5-5:3,7,0,1,2,4,5,6,8,9")
    assert spec.task_classes == ((3, 7, 0, 1, 2), (4, 5, 6, 8, 9))


@pytest.mark.parametrize(
    "bad", ["", "X5-5", "D5-4", "D5", "D0-10", "DP10-5", "D5-5:1,2,3", "D5-5:0,0,1,2,3,4,5,6,7,8"]
)
def test_malformed_specs_show_accepted_forms(bad: str) -> None:
    with pytest.raises(ConfigError, match="accepted forms"):
        parse_spec(bad)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**40), case=st.sampled_from(["D2-2-2-2-2", "D5-5", "D9-1", "D3-3-4"]))
def test_seeded_class_order_permutes_the_classes_by_the_seed(seed: int, case: str) -> None:
    from masq.tasks import seeded_blocks

    fixed = make(case, dataset=DATA)
    tasks = make(case, dataset=DATA, class_seed=seed)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(seed)).tolist()
    assert [c for t in tasks for c in t.classes] == order  # the blocks over the permutation
    assert [len(t.classes) for t in tasks] == [len(t.classes) for t in fixed]
    assert tuple(t.classes for t in tasks) == seeded_blocks([t.classes for t in fixed], 10, seed)
    for t in tasks:  # each task holds exactly its classes' samples, as a fixed split does
        expected = make("D" + "-".join(str(len(u.classes)) for u in tasks) + ":"
                        + ",".join(map(str, order)), dataset=DATA)  # fmt: skip
        same = next(e for e in expected if e.classes == t.classes)
        for part in PARTS:
            assert torch.equal(getattr(t, part)[1], getattr(same, part)[1])
            assert torch.equal(getattr(t, part)[0], getattr(same, part)[0])
    assert make(case, dataset=DATA, class_seed=seed)[0].classes == tasks[0].classes  # same seed


def test_seeded_class_order_differs_between_seeds_and_refuses_what_it_cannot_permute() -> None:
    orders = {tuple(t.classes for t in make("D2-2-2-2-2", dataset=DATA, class_seed=s))
              for s in range(8)}  # fmt: skip
    assert len(orders) == 8
    for spec in ("DP10-10", "D5-5:3,7,0,1,2,4,5,6,8,9"):
        with pytest.raises(ConfigError, match="--class-order seeded") as err:
            make(spec, dataset=DATA, class_seed=1)
        assert "\n" not in str(err.value)


def test_class_order_of_a_run_config_reaches_its_tasks_and_its_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from masq import data
    from masq.config import RunConfig
    from masq.protocol import make_tasks
    from masq.runid import run_id
    from masq.streams import stream_seed

    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: DATA)
    base = RunConfig(slt="D2-2-2-2-2", seed=3)
    seeded = RunConfig(slt="D2-2-2-2-2", seed=3, class_order="seeded")
    assert run_id(base) == run_id(RunConfig(slt="D2-2-2-2-2", seed=3, class_order="fixed"))
    assert run_id(seeded) != run_id(base)  # the default leaves old ids as they were
    assert [t.classes for t in make_tasks(base)] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    expected = make("D2-2-2-2-2", dataset=DATA, class_seed=stream_seed(3, "class-order"))
    assert [t.classes for t in make_tasks(seeded)] == [t.classes for t in expected]


@st.composite
def class_splits(draw: st.DrawFn) -> tuple[str, list[int]]:
    order = draw(st.permutations(list(range(10))))
    cuts = sorted(draw(st.sets(st.integers(1, 9), min_size=1, max_size=9)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, 10], strict=True)]
    use_order = draw(st.booleans())
    spec = "D" + "-".join(map(str, sizes))
    if use_order:
        spec += ":" + ",".join(map(str, order))
    return spec, (order if use_order else list(range(10)))


@settings(max_examples=40, deadline=None)
@given(class_splits())
def test_class_splits_partition_the_labels(case: tuple[str, list[int]]) -> None:
    spec, order = case
    tasks = make(spec, dataset=DATA)
    assert [c for t in tasks for c in t.classes] == order
    for part in PARTS:
        total = sum(getattr(t, part)[1].numel() for t in tasks)
        assert total == len(getattr(DATA, part))  # disjoint and covering
        for t in tasks:
            y = getattr(t, part)[1]
            assert set(y.tolist()) <= set(t.classes)
            assert t.permutation is None


def test_tasks_keep_original_order_and_scale() -> None:
    d1 = make("D5-5", dataset=DATA)[0]
    for part in PARTS:
        split = getattr(DATA, part)
        mask = split.labels < 5
        x, y = getattr(d1, part)
        assert torch.equal(y, torch.from_numpy(split.labels[mask]))
        expected = torch.from_numpy(split.images[mask].reshape(-1, 784)).float() / 255.0
        assert torch.equal(x, expected)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0.0 <= x.min() and x.max() <= 1.0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_tasks=st.integers(2, 4))
def test_permutations_are_bijections_applied_alike(seed: int, n_tasks: int) -> None:
    tasks = make("DP" + "-".join(["10"] * n_tasks), dataset=DATA, seed=seed)
    assert tasks[0].permutation is None
    base = tasks[0]
    for t in tasks[1:]:
        perm = t.permutation
        assert perm is not None
        assert torch.equal(torch.sort(perm).values, torch.arange(784))
        for part in PARTS:
            x0, y0 = getattr(base, part)
            x, y = getattr(t, part)
            assert torch.equal(y, y0)
            assert torch.equal(x, x0[:, perm])
    perms = [t.permutation for t in tasks[1:]]
    if len(perms) > 1:
        assert not torch.equal(perms[0], perms[1])


def test_same_seed_same_tasks_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = make("DP10-10", dataset=DATA, seed=7)
    b = make("DP10-10", dataset=DATA, seed=7)
    c = make("DP10-10", dataset=DATA, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[1].permutation, b[1].permutation)
    assert not torch.equal(a[1].permutation, c[1].permutation)
    assert torch.equal(a[1].train[0], b[1].train[0])


def test_union_test_concatenates_every_task() -> None:
    tasks = make("D2-3-5", dataset=DATA)
    x, y = union_test(tasks)
    assert x.shape[0] == len(DATA.test)
    assert torch.equal(y, torch.cat([t.test[1] for t in tasks]))
    dp = make("DP10-10", dataset=DATA)
    assert union_test(dp)[0].shape[0] == 2 * len(DATA.test)
    with pytest.raises(ConfigError):
        union_test(tasks, part="nope")


@pytest.mark.parametrize("pad", [1, 2])
def test_padding_frames_each_image_with_zeros_before_the_permutation(pad: int) -> None:
    side = 28 + 2 * pad
    plain, padded = (
        make("DP10-10", dataset=DATA, seed=5),
        make("DP10-10", dataset=DATA, seed=5, pad=pad),
    )
    for part in PARTS:
        x0, y0 = getattr(plain[0], part)
        x, y = getattr(padded[0], part)
        assert x.shape == (x0.shape[0], side * side) and torch.equal(y, y0)
        image = x.reshape(-1, side, side)
        assert torch.equal(image[:, pad : pad + 28, pad : pad + 28].reshape(-1, 784), x0)
        frame = image.clone()
        frame[:, pad : pad + 28, pad : pad + 28] = 0
        assert not frame.any()  # the frame is all zeros
        perm = padded[1].permutation  # a permutation of all (28 + 2·pad)² pixels, frame included
        assert perm is not None and torch.equal(torch.sort(perm).values, torch.arange(side * side))
        assert torch.equal(getattr(padded[1], part)[0], x[:, perm])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_bad_pad_is_a_one_line_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="pad: must be an integer >= 0") as err:
        make("DP10-10", dataset=DATA, pad=bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_pad_of_a_run_config_reaches_its_tasks_its_model_and_its_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from masq import data
    from masq.config import RunConfig
    from masq.protocol import build_model, make_tasks
    from masq.runid import run_id

    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: DATA)
    base = RunConfig(slt="DP10-10", hidden=(8,))
    padded = RunConfig(slt="DP10-10", hidden=(8,), pad=2)
    assert run_id(base) == run_id(RunConfig(slt="DP10-10", hidden=(8,), pad=0))
    assert run_id(padded) != run_id(base)  # the default leaves old ids as they were
    tasks = make_tasks(padded)
    assert tasks[0].train[0].shape[1] == 32 * 32
    assert build_model(padded, tasks)[0].in_features == 32 * 32


def test_permute_first_gives_task_1_its_own_permutation_and_leaves_the_others() -> None:
    plain = make("DP10-10-10", dataset=DATA, seed=5)
    first = make("DP10-10-10", dataset=DATA, seed=5, first_seed=11)
    other = make("DP10-10-10", dataset=DATA, seed=5, first_seed=12)
    perm = first[0].permutation
    assert plain[0].permutation is None and perm is not None
    assert torch.equal(torch.sort(perm).values, torch.arange(784))
    assert not torch.equal(perm, torch.arange(784))
    assert not torch.equal(perm, other[0].permutation)  # seeded by first_seed
    assert torch.equal(perm, make("DP10-10-10", dataset=DATA, seed=5, first_seed=11)[0].permutation)
    for t in (1, 2):  # tasks 2..T as without it
        assert torch.equal(first[t].permutation, plain[t].permutation)
        assert torch.equal(first[t].train[0], plain[t].train[0])
    for part in PARTS:
        x0, y0 = getattr(plain[0], part)
        x, y = getattr(first[0], part)
        assert torch.equal(x, x0[:, perm]) and torch.equal(y, y0)


def test_permute_first_on_a_class_split_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="--permute-first: 'D5-5' is a class split") as err:
        make("D5-5", dataset=DATA, first_seed=3)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["D5-5", "DP10-10"])
def test_train_on_val_trains_on_the_validation_samples_first_then_the_training_ones(
    spec: str,
) -> None:
    plain = make(spec, dataset=DATA, seed=2)
    both = make(spec, dataset=DATA, seed=2, train_on_val=True)
    for p, b in zip(plain, both, strict=True):
        assert torch.equal(b.train[0], torch.cat((p.val[0], p.train[0])))
        assert torch.equal(b.train[1], torch.cat((p.val[1], p.train[1])))
        for part in ("val", "test"):
            assert all(
                torch.equal(u, v) for u, v in zip(getattr(b, part), getattr(p, part), strict=True)
            )


def test_permute_first_and_train_on_val_of_a_run_config_reach_its_tasks_and_its_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from masq import data
    from masq.config import RunConfig
    from masq.protocol import make_tasks
    from masq.runid import run_id
    from masq.streams import stream_seed

    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: DATA)
    base = RunConfig(slt="DP10-10", hidden=(8,), seed=4)
    first = RunConfig(slt="DP10-10", hidden=(8,), seed=4, permute_first=True)
    on_val = RunConfig(slt="DP10-10", hidden=(8,), seed=4, train_on_val=True)
    ids = {run_id(base), run_id(first), run_id(on_val)}
    assert len(ids) == 3  # each changes the id; at their defaults old ids stay as they were
    assert run_id(base) == run_id(RunConfig(slt="DP10-10", hidden=(8,), seed=4, train_on_val=False))
    expected = make(
        "DP10-10", dataset=DATA, seed=stream_seed(4, "tasks"),
        first_seed=stream_seed(4, "task1-permutation"),
    )  # fmt: skip
    assert torch.equal(make_tasks(first)[0].permutation, expected[0].permutation)
    assert make_tasks(on_val)[1].train[0].shape[0] == len(DATA.train) + len(DATA.val)
    assert make_tasks(base)[1].train[0].shape[0] == len(DATA.train)


def test_a_run_config_refuses_permute_first_on_a_class_split() -> None:
    from masq.config import RunConfig

    with pytest.raises(ConfigError, match="permute_first: 'D5-5' is a class split") as err:
        RunConfig(slt="D5-5", permute_first=True).validate()
    assert "\n" not in str(err.value)
    RunConfig(slt="DP10-10", permute_first=True).validate()
