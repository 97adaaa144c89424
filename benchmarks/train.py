"""Milliseconds per iteration of ``masq.training.train_task`` against a bare PyTorch loop.

Both do the same work: the same net and initial weights, mini-batches of B = 100 gathered
from the same 28,000 x 784 training tensor (the size of D5-5's D1), cross-entropy, the same
Adam (``masq.training.make_adam``: fused where available), and optionally the EWC penalty
(λ/2) Σ F (θ − θ*)² -- ``masq.consolidation.ewc.penalty`` in train_task, an inline sum in
the bare loop.
train_task runs without evaluation sets here (pure loop overhead); the second table gives the
cost of one evaluation of a 10,000-image test set and the share of time evaluation takes at
the default ``eval_every``. Variants are interleaved and repeated; medians are reported.

    python benchmarks/train.py [--threads 2] [--iters 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared, busy machine spinning threads
# make 2-thread runs several times slower and the timings erratic. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import pin_threads, print_table
from masq.consolidation import ewc
from masq.models import mlp
from masq.training import (
    DEFAULT_EVAL_EVERY,
    TrainConfig,
    eval_counts,
    make_adam,
    minibatch_indices,
    train_task,
)

N_TRAIN = 28_000
N_TEST = 10_000
LAM = 1e5


def data(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Random MNIST-shaped train (28,000) and test (10,000) sets."""
    g = torch.Generator().manual_seed(seed)
    train = (torch.rand(N_TRAIN, 784, generator=g), torch.randint(0, 10, (N_TRAIN,), generator=g))
    test = (torch.rand(N_TEST, 784, generator=g), torch.randint(0, 10, (N_TEST,), generator=g))
    return train, test


def importance_like(model: nn.Module) -> dict[str, Tensor]:
    """A positive importance per parameter (its values do not matter for the timing)."""
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def bare_loop(
    model: nn.Module, train: tuple[Tensor, Tensor], iters: int, anchor: ewc.Anchor | None
) -> None:
    """The reference: the plainest PyTorch loop doing the same work."""
    x, y = train
    params = dict(model.named_parameters())
    optimizer = make_adam(model.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    for idx in minibatch_indices(N_TRAIN, 100, iters, generator):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if anchor is not None:
            quad = sum(
                (anchor.importance[n] * (p - anchor.params[n]) ** 2).sum()
                for n, p in params.items()
            )
            loss = loss + 0.5 * LAM * quad
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def masq_loop(
    model: nn.Module, train: tuple[Tensor, Tensor], iters: int, anchor: ewc.Anchor | None
) -> None:
    """masq.training.train_task, no evaluation sets."""
    penalty = None if anchor is None else (lambda m: ewc.penalty(m, anchor, LAM))
    train_task(model, train, TrainConfig(lr=1e-3, iters=iters, seed=0), penalty=penalty)


def ms_per_iter(
    loop: Callable[..., None],
    hidden: tuple[int, ...],
    train: tuple[Tensor, Tensor],
    iters: int,
    with_penalty: bool,
) -> float:
    model = mlp(hidden, seed=0)
    anchor = ewc.anchor(model, importance_like(model)) if with_penalty else None
    loop(model, train, 5, anchor)  # warm-up (allocator, Adam state)
    model = mlp(hidden, seed=0)
    start = time.perf_counter()
    loop(model, train, iters, anchor)
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pin_threads(args.threads)
    train, test = data()
    rows, eval_rows = [], []
    for hidden in ((200, 200), (800, 800)):
        net = "784-" + "-".join(map(str, hidden)) + "-10"
        for with_penalty in (False, True):
            bare, ours = [], []
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                bare.append(ms_per_iter(bare_loop, hidden, train, args.iters, with_penalty))
                ours.append(ms_per_iter(masq_loop, hidden, train, args.iters, with_penalty))
            b, o = statistics.median(bare), statistics.median(ours)
            rows.append(
                {
                    "net": net,
                    "penalty": "EWC" if with_penalty else "none",
                    "bare": b,
                    "train_task": o,
                    "overhead": f"{(o / b - 1) * 100:+.1f} %",
                }
            )
        model = mlp(hidden, seed=0)
        sets = {"D1": (test[0][:5000], test[1][:5000]), "D2": (test[0][5000:], test[1][5000:])}
        eval_counts(model, sets)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            eval_counts(model, sets)
            times.append((time.perf_counter() - start) * 1e3)
        ev = statistics.median(times)
        it = rows[-2]["train_task"]
        eval_rows.append(
            {
                "net": net,
                "eval ms": ev,
                "iterations": ev / it,
                "share": f"{ev / (ev + DEFAULT_EVAL_EVERY * it) * 100:.1f} %",
            }
        )
    title = (
        f"ms per iteration, B = 100, {args.threads} threads "
        f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), median of {args.repeats} x "
        f"{args.iters} iterations (torch {torch.__version__})"
    )
    print_table(
        title,
        rows,
        [
            ("net", "net"),
            ("penalty", "penalty"),
            ("bare", "bare loop ms"),
            ("train_task", "train_task ms"),
            ("overhead", "overhead"),
        ],
    )
    print_table(
        f"one evaluation of 10,000 test images; share of time at eval_every={DEFAULT_EVAL_EVERY}",
        eval_rows,
        [
            ("net", "net"),
            ("eval ms", "eval ms"),
            ("iterations", "= iterations"),
            ("share", "evaluation share"),
        ],
    )


if __name__ == "__main__":
    main()
