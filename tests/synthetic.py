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
