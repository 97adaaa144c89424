"""Dataset acquisition: sources, checksums and a cache, down to uint8 arrays.

(Interface fixed; the loading machinery is being written for the foundation issue.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """One part of a dataset: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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
