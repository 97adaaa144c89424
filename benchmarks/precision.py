"""bf16 against fp32, the direct EWC gradient against the autograd penalty, and evaluation.

Tables (medians of interleaved repeats, so load changes hit every variant alike):

1. ms per training iteration of ``masq.training.train_task`` (B = 100, Adam) per net, precision
   and penalty: none, "autograd" (``ewc.penalty`` added to the loss) and "direct"
   (``QuadraticPenalty``: λ F (θ − θ*) added to the gradients, what the protocol uses);
2. stacked re-training (K runs at once, ``masq.stacked``) against one by one, per precision;
3. evaluation: ms per evaluation of 10,000 images, its share of a phase per schedule, and how
   often the bf16 argmax differs from the fp32 one on MNIST-shaped data.

Usage: python benchmarks/precision.py [--threads 2] [--iters 100] [--repeats 5] [--stack 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from _common import pin_threads, print_table
from masq import stacked
from masq.consolidation import ewc
from masq.consolidation.penalty import QuadraticPenalty
from masq.models import mlp
from masq.training import TrainConfig, eval_counts, eval_iterations, train_task
from train import data, importance_like  # the same random MNIST-shaped data and F

LAM = 1e5


def one_run(hidden: tuple[int, ...], train: tuple[Tensor, Tensor], iters: int, precision: str,
            penalty: str) -> float:  # fmt: skip
    """ms per iteration of one train_task call (after a 5-iteration warm-up)."""

    def go(n: int) -> float:
        model = mlp(hidden, seed=0)
        anchor = ewc.anchor(model, importance_like(model))
        kw: dict = {}
        if penalty == "autograd":
            kw["penalty"] = lambda m: ewc.penalty(m, anchor, LAM)
        elif penalty == "direct":
            kw["penalty_grad"] = QuadraticPenalty(model, anchor, LAM)
        config = TrainConfig(lr=1e-4, iters=n, seed=0, precision=precision)
        start = time.perf_counter()
        train_task(model, train, config, **kw)
        return (time.perf_counter() - start) / n * 1e3

    go(5)
    return go(iters)


def stacked_run(hidden: tuple[int, ...], train: tuple[Tensor, Tensor], iters: int,
                precision: str, k: int) -> float:  # fmt: skip
    """ms per iteration per run of K stacked runs with the EWC penalty."""
    model = mlp(hidden, seed=0)
    state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    imp = importance_like(model)

    def go(n: int) -> float:
        start = time.perf_counter()
        stacked.train_stacked(state, train, lrs=[1e-4] * k, lams=[LAM] * k, importances=[imp] * k,
                              iters=n, batch_size=100, eval_every=n, seed=0,
                              precision=precision)  # fmt: skip
        return (time.perf_counter() - start) / n / k * 1e3

    go(3)
    return go(iters)


def median_of(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stack", type=int, default=16)
    parser.add_argument("--nets", nargs="+", default=["200-200", "800-800"])
    args = parser.parse_args()
    pin_threads(args.threads)
    train, test = data()
    nets = [tuple(int(h) for h in n.split("-")) for n in args.nets]
    wait = os.environ.get("OMP_WAIT_POLICY", "(unset)")

    rows = []
    for hidden in nets:
        variants = [(p, q) for p in ("fp32", "bf16") for q in ("none", "autograd", "direct")]
        times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                times[v].append(one_run(hidden, train, args.iters, *v))
        med = {v: statistics.median(t) for v, t in times.items()}
        for precision in ("fp32", "bf16"):
            none = med[(precision, "none")]
            rows.append({
                "net": "784-" + "-".join(map(str, hidden)) + "-10", "precision": precision,
                "none": f"{none:.2f}", "autograd": f"{med[(precision, 'autograd')]:.2f}",
                "direct": f"{med[(precision, 'direct')]:.2f}",
                "direct overhead": f"{(med[(precision, 'direct')] / none - 1) * 100:+.1f} %",
                "vs fp32": f"{med[(precision, 'direct')] / med[('fp32', 'direct')]:.2f}x",
            })  # fmt: skip
    print_table(
        f"ms per iteration of train_task, B = 100, {args.threads} threads "
        f"(OMP_WAIT_POLICY={wait}), median of {args.repeats} x {args.iters} iterations",
        rows,
        [("net", "net"), ("precision", "precision"), ("none", "no penalty"),
         ("autograd", "EWC autograd"), ("direct", "EWC direct"),
         ("direct overhead", "EWC direct overhead"), ("vs fp32", "EWC direct / fp32")],
    )  # fmt: skip

    rows = []
    for hidden in nets:
        for precision in ("fp32", "bf16"):
            one = median_of(
                lambda h=hidden, p=precision: one_run(h, train, args.iters, p, "direct"),
                args.repeats,
            )
            st = median_of(
                lambda h=hidden, p=precision: stacked_run(h, train, args.iters, p, args.stack),
                args.repeats,
            )
            rows.append({"net": "784-" + "-".join(map(str, hidden)) + "-10",
                         "precision": precision, "one": f"{one:.2f}", "stacked": f"{st:.2f}",
                         "speed-up": f"{one / st:.2f}x"})  # fmt: skip
    print_table(
        f"re-training with EWC, ms per iteration per run: one by one vs stacked K = {args.stack}",
        rows,
        [("net", "net"), ("precision", "precision"), ("one", "one by one"),
         ("stacked", f"stacked K={args.stack}"), ("speed-up", "speed-up")],
    )  # fmt: skip

    rows = []
    sets = {"D1": (test[0][:5000], test[1][:5000]), "D2": (test[0][5000:], test[1][5000:])}
    for hidden in nets:
        model = mlp(hidden, seed=0)
        with torch.no_grad():  # argmax agreement of bf16 and fp32 on 10,000 inputs
            fp = model(test[0]).argmax(1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf = model(test[0]).argmax(1)
        differ = (fp != bf).float().mean().item()
        it = median_of(lambda h=hidden: one_run(h, train, args.iters, "fp32", "direct"), 3)
        for precision in ("fp32", "bf16"):
            ev = median_of(
                lambda m=model, p=precision: timed(lambda: eval_counts(m, sets, precision=p)),
                args.repeats,
            )
            for schedule in ("every", "dense-early", "paper"):
                n = len(eval_iterations(5000, 250, schedule))
                share = n * ev / (n * ev + 5000 * it)
                rows.append({"net": "784-" + "-".join(map(str, hidden)) + "-10",
                             "precision": precision, "eval ms": f"{ev:.1f}",
                             "schedule": schedule, "points": n, "share": f"{100 * share:.0f} %",
                             "argmax differs": f"{100 * differ:.2f} %"})  # fmt: skip
    print_table(
        "evaluation of 10,000 images: its share of a 5,000-iteration phase (fp32 training with "
        "EWC) per schedule; bf16 vs fp32 argmax disagreement on random inputs",
        rows,
        [("net", "net"), ("precision", "eval precision"), ("eval ms", "ms / evaluation"),
         ("schedule", "schedule"), ("points", "points"), ("share", "evaluation share"),
         ("argmax differs", "argmax bf16 ≠ fp32")],
    )  # fmt: skip


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    main()
