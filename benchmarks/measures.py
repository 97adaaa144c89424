"""Every registered importance measure on one trained network: cost and typical magnitude.

    python benchmarks/measures.py [--synthetic] [--threads 2] [--iters 5000] [--samples 10000]

A 784-800-800-10 ReLU MLP (masq.models.mlp, torch init, seed 0) is trained on D1 of D5-5
(MNIST classes 0-4; Adam lr 1e-3, B = 100, --iters iterations: the paper's task-1 training)
with SI's tracker attached, which gives SI's importance and its cost per step. Then each
measure of the registry runs through ``Measure.compute`` on the first --samples training
samples of D1 with the protocol's MeasureContext (batch size 1,000 unless the variant says
otherwise), and the table prints per measure and variant:

- seconds for the pass and seconds per 10,000 samples (the pass over n samples scaled by
  10,000 / n; measures on a subset say how many they read),
- the result's size and the rise of the process's peak RSS during the pass,
- the mean and the largest entry of the importance's diagonal (the diagonal of G ⊗ A for
  K-FAC, of the layer blocks for "fisher-blocks"): the scale a λ must balance.

SI's row: the tracker's cost per training step beside a plain step (both measured on the
same training, --step-probe iterations each), and its Ω after the training.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor

from _common import load_d1, measure, pin_threads, print_table
from masq.config import RunConfig
from masq.importance import MeasureContext, get_measure
from masq.models import mlp
from masq.training import TrainConfig, train_task

# (row name, RunConfig changes) of every measured variant.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fisher empirical", {"importance": "fisher", "fisher_labels": "empirical"}),
    ("fisher exact", {"importance": "fisher", "fisher_labels": "exact"}),
    ("fisher sample", {"importance": "fisher", "fisher_labels": "sample"}),
    ("fisher predicted", {"importance": "fisher", "fisher_labels": "predicted"}),
    ("fisher batched b=128",
     {"importance": "fisher", "fisher_labels": "batched", "masq_batch": 128}),
    ("fisher exact n=1000",
     {"importance": "fisher", "fisher_labels": "exact", "fisher_samples": 1000}),
    ("masq mean B=1000", {"importance": "masq", "scale": "mean"}),
    ("masq sum B=1000", {"importance": "masq", "scale": "sum"}),
    ("mas", {"importance": "mas"}),
    ("l2", {"importance": "l2"}),
    ("kfac exact", {"importance": "kfac", "fisher_labels": "exact"}),
    ("kfac empirical", {"importance": "kfac", "fisher_labels": "empirical"}),
    ("fisher-blocks exact n=1000",
     {"importance": "fisher-blocks", "fisher_labels": "exact", "fisher_samples": 1000}),
)  # fmt: skip


def diagonal(name: str, imp: dict[str, Tensor]) -> Tensor:
    """The importance's diagonal entries as one flat float64 tensor."""
    kind = get_measure(name).kind
    if kind == "kfac":
        parts = []
        for key in (k for k in imp if k.endswith(".A")):
            a, g = imp[key].double(), imp[key[:-2] + ".G"].double()
            parts.append(torch.outer(g.diagonal(), a.diagonal()).flatten())
        return torch.cat(parts)
    if kind == "fisher-blocks":
        parts = []
        for key in (k for k in imp if k.endswith(".U")):
            u, v = imp[key].double(), imp[key[:-2] + ".V"].double()  # [N, T, out], [N, cols]
            parts.append((u.square().sum(1).T @ v.square()).flatten())
        return torch.cat(parts)
    return torch.cat([t.double().flatten() for t in imp.values()])


def row(name: str, imp: dict[str, Tensor], stats: dict[str, Any], n: int) -> dict[str, Any]:
    """One table row: time, time per 10k samples, sizes and the diagonal's scale."""
    diag = diagonal(name, imp)
    return {
        "seconds": stats["seconds"],
        "per10k": stats["seconds"] * 10_000 / max(n, 1) if n else None,
        "samples": n,
        "mib": sum(t.numel() * t.element_size() for t in imp.values()) / 2**20,
        "rss": stats["delta_mib"],
        "mean": float(diag.mean()),
        "max": float(diag.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="random images, not MNIST")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5000, help="task-1 training iterations")
    parser.add_argument("--samples", type=int, default=10_000, help="samples per pass")
    parser.add_argument("--step-probe", type=int, default=300, help="steps timed per arm")
    args = parser.parse_args()
    pin_threads(args.threads)
    x, y, note = load_d1(args.synthetic)
    model = mlp((800, 800), in_features=784, classes=10, init="torch", seed=0)
    si = get_measure("si")
    base = RunConfig(importance="si")
    tracker = si.tracker(model, MeasureContext(si.settings(base), 1000))
    train = TrainConfig(lr=1e-3, iters=args.iters, batch_size=100, seed=1)
    start = time.perf_counter()
    train_task(model, (x, y), train, step_hook=tracker.step, grad_hook=tracker.observe_grad)
    train_s = time.perf_counter() - start
    si_imp = tracker.importance()
    # the tracker's cost per step: the same number of steps on a copy, with and without it
    probe = TrainConfig(lr=1e-3, iters=args.step_probe, batch_size=100, seed=2)
    plain_s, tracked_s = [], []
    for _ in range(2):  # interleaved, twice
        twin = mlp((800, 800), in_features=784, classes=10, init="torch", seed=0)
        twin.load_state_dict(model.state_dict())
        t0 = time.perf_counter()
        train_task(twin, (x, y), probe)
        plain_s.append((time.perf_counter() - t0) / args.step_probe)
        other = si.tracker(twin, MeasureContext(si.settings(base), 1000))
        t0 = time.perf_counter()
        train_task(twin, (x, y), probe, step_hook=other.step, grad_hook=other.observe_grad)
        tracked_s.append((time.perf_counter() - t0) / args.step_probe)
    n = min(args.samples, len(x))
    xs, ys = x[:n].contiguous(), y[:n].contiguous()
    rows = []
    for label, changes in VARIANTS:
        config = base.with_(**changes)
        measure_ = get_measure(config.importance)
        ctx = MeasureContext(
            measure_.settings(config), config.masq_batch, torch.Generator().manual_seed(0)
        )
        stats, imp = measure(lambda m=measure_, c=ctx: m.compute(model, (xs, ys), c))
        read = min(n, config.fisher_samples) if config.fisher_samples else n
        read = read if measure_.reads_data else 0  # l2: no pass over data
        rows.append({"measure": label} | row(config.importance, imp, stats, read))
    si_row = row("si", si_imp, {"seconds": 0.0, "delta_mib": 0.0}, 0)
    rows.append(
        {"measure": "si (during training)"}
        | si_row
        | {
            "seconds": None,
            "per10k": None,
            "rss": None,
            "step": f"{1e3 * min(tracked_s):.2f} vs {1e3 * min(plain_s):.2f} ms",
        }
    )
    print(f"data: {note}; {len(x)} training samples, passes over {n}")
    print(
        f"task-1 training: 784-800-800-10, {args.iters} Adam iterations at B = 100 with SI's "
        f"tracker, {train_s:.1f} s; {args.threads} thread(s)"
    )
    print_table(
        "Every measure at the trained network (diagonal: of G ⊗ A for K-FAC, of the layer "
        "blocks for fisher-blocks)",
        rows,
        [
            ("measure", "measure"),
            ("samples", "samples read"),
            ("seconds", "s"),
            ("per10k", "s / 10k samples"),
            ("mib", "result MiB"),
            ("rss", "peak RSS rise MiB"),
            ("mean", "mean diagonal entry"),
            ("max", "max diagonal entry"),
            ("step", "SI: step with vs without tracker"),
        ],
    )


if __name__ == "__main__":
    main()
