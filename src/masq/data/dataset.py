"""What :func:`masq.data.load` returns: a :class:`Dataset` of three :class:`Split` parts,
and :func:`classic_split`, which cuts a release's four arrays into those parts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from masq.data.idx import RawIdx
from masq.errors import DataError

__all__ = ["N_VAL", "Dataset", "Split", "classic_split"]

#: Size of the validation part: the first N_VAL images of the original training file.
N_VAL = 5000


@dataclass(frozen=True)
class Split:
    """One part of a dataset: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int = 10) -> np.ndarray:
        """``counts[c] = #{n : labels[n] == c}`` for c = 0..num_classes-1 (int64)."""
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)


@dataclass(frozen=True)
class Dataset:
    """A dataset in the classic split: ``train``, ``val`` and ``test`` parts."""

    name: str
    train: Split
    val: Split
    test: Split
    source: str = "synthetic"

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1

    def splits(self) -> dict[str, Split]:
        """The three parts by name, in the order train, val, test."""
        return {"train": self.train, "val": self.val, "test": self.test}


def classic_split(raw: RawIdx, n_val: int = N_VAL) -> tuple[Split, Split, Split]:
    """(train, val, test): val = training file[:n_val], train = training file[n_val:].

    Labels become int64; arrays are fresh contiguous copies.
    """
    if not 0 < n_val < raw.train_labels.shape[0]:
        raise DataError(f"training file has {raw.train_labels.shape[0]} images, need > {n_val}")

    def part(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(np.ascontiguousarray(images), labels.astype(np.int64))

    return (
        part(raw.train_images[n_val:], raw.train_labels[n_val:]),
        part(raw.train_images[:n_val], raw.train_labels[:n_val]),
        part(raw.test_images, raw.test_labels),
    )
