"""Small synthetic datasets for unit tests (no download, no disk)."""

from __future__ import annotations

import numpy as np

from masq.data import Dataset, Split


def synthetic_split(n: int, seed: int, num_classes: int = 10) -> Split:
    """``n`` random uint8 images whose labels cycle through the classes in a seeded order."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    return Split(images=images, labels=labels)


def synthetic_dataset(n_train: int = 300, n_val: int = 50, n_test: int = 100) -> Dataset:
    """A tiny MNIST-shaped dataset with all 10 classes in every part."""
    return Dataset(
        name="synthetic",
        train=synthetic_split(n_train, 1),
        val=synthetic_split(n_val, 2),
        test=synthetic_split(n_test, 3),
        source="synthetic",
    )


def learnable_split(n: int, seed: int, num_classes: int = 10) -> Split:
    """``n`` uint8 images, each 0.35 x its class's fixed random prototype + 0.65 x noise.

    The prototypes come from a fixed seed (12345) shared by every split, so a net can learn
    the classes; labels cycle through the classes in an order seeded by ``seed``.
    """
    protos = np.random.default_rng(12345).integers(0, 256, size=(num_classes, 28, 28))
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    noise = rng.integers(0, 256, size=(n, 28, 28))
    images = (0.35 * protos[labels] + 0.65 * noise).astype(np.uint8)
    return Split(images=images, labels=labels)


def learnable_dataset(n_train: int = 600, n_val: int = 100, n_test: int = 200) -> Dataset:
    """A tiny MNIST-shaped dataset whose classes can be learnt (curves that move); the
    dataset of the golden records in tests/data/golden_t2_v1.json."""
    return Dataset(
        name="learnable",
        train=learnable_split(n_train, 11),
        val=learnable_split(n_val, 12),
        test=learnable_split(n_test, 13),
        source="synthetic",
    )


# Relative tolerance of a golden record's importance summary on another CPU: its float32
# sums take the order of additions the CPU's kernels choose (an Intel and an AMD machine differ
# in the last 1-4 bits, i.e. below 3e-7 relative); the training curves stay bit-exact.
SUMMARY_RTOL = 1e-5


def assert_same_summary(got: dict, golden: dict, what: object = "importance_summary") -> None:
    """``got`` and ``golden`` ({tensor: {statistic: value}}) have the same tensors and
    statistics, each value within :data:`SUMMARY_RTOL` of the golden one."""
    import pytest

    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in golden.items()}, what
    for name, stats in golden.items():
        for stat, value in stats.items():
            assert got[name][stat] == pytest.approx(value, rel=SUMMARY_RTOL, abs=0), (
                what,
                name,
                stat,
            )
