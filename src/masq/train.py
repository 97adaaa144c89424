"""Training on one task and evaluation: a curve out.

CONTRACT STUB written by the lead: ``masq.search``'s batched (stacked) re-training
reuses ``minibatch_indices`` and ``eval_counts``/``accuracies`` so that K stacked runs
see exactly the mini-batches and evaluation points of K separate ``train_task`` calls.
Keep these signatures (add keyword arguments with defaults if needed); fill in the bodies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

XY = tuple[Tensor, Tensor]
Curve = dict[str, list[float]]


@dataclass(frozen=True)
class TrainConfig:
    """One task's training: Adam (fresh state) at ``lr``, ``iters`` mini-batches of
    ``batch_size`` drawn without replacement and reshuffled each epoch from a generator
    seeded by ``seed``; evaluation every ``eval_every`` iterations (and at 0 and the end)."""

    lr: float = 1e-3
    iters: int = 5000
    batch_size: int = 100
    eval_every: int = 50
    seed: int = 0


def minibatch_indices(
    n: int, batch_size: int, iters: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """``iters`` index tensors: each epoch a fresh ``randperm(n, generator)`` cut into
    consecutive batches of ``batch_size`` (a short remainder is dropped... or kept: the
    implementer decides and documents it); a new epoch starts when the permutation is used up."""
    raise NotImplementedError


def eval_counts(
    model: nn.Module, sets: Mapping[str, XY], batch_size: int = 10_000
) -> dict[str, tuple[int, int]]:
    """{set name: (correct, total)} without autograd, in large batches, model mode restored."""
    raise NotImplementedError


def accuracies(
    counts: Mapping[str, tuple[int, int]], unions: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Accuracy of every set, plus each union (e.g. {"D1∪D2": ("D1", "D2")}) from the counts."""
    raise NotImplementedError


def train_task(
    model: nn.Module,
    train: XY,
    config: TrainConfig,
    *,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    eval_sets: Mapping[str, XY] | None = None,
    unions: Mapping[str, Sequence[str]] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
) -> Curve:
    """Train ``model`` in place: loss = cross_entropy(model(x), y) + penalty(model)."""
    raise NotImplementedError
