"""The stacked path's hand-written back-propagation against PyTorch's ensembling pattern.

``torch.func.stack_module_state`` + ``vmap(grad(functional_call))`` computes the same K
gradients with batched matmuls and follows autocast by itself; ``masq.stacked.loss_grads``
back-propagates by hand into buffers allocated once. This prints ms per gradient step (the
K-run batch-mean cross-entropy gradients of one mini-batch, no optimizer) for both, per net,
K and precision, with the largest relative difference of their gradients.

Usage: python benchmarks/ensemble.py [--threads 2] [--k 16] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, stack_module_state, vmap

from _common import pin_threads, print_table
from masq import stacked
from masq.models import mlp


def timed(fn: Callable[[], object], steps: int) -> float:
    """ms per call of ``fn`` over ``steps`` calls, after a warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def measure_net(net: str, k: int, steps: int, repeats: int, x: Tensor, y: Tensor) -> list[dict]:
    """The rows of one net: both precisions, hand-written and torch.func."""
    hidden = tuple(int(h) for h in net.split("-"))
    models = [mlp(hidden, seed=s) for s in range(k)]
    model = stacked.stack_states([m.state_dict() for m in models])
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p: dict, b: dict, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    ens = vmap(grad(loss), in_dims=(0, 0, None, None))
    rows = []
    for precision in ("fp32", "bf16"):
        low = precision == "bf16"
        ws = stacked.Workspace.create(model, 100, torch.bfloat16 if low else torch.float32)

        def hand(ws: stacked.Workspace = ws) -> list[Tensor]:
            return stacked.loss_grads(model, ws, x, y)

        def func(low: bool = low) -> dict:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
                return ens(params, buffers, x, y)

        t_hand = statistics.median(timed(hand, steps) for _ in range(repeats))
        t_func = statistics.median(timed(func, steps) for _ in range(repeats))
        a, b = hand(), func()
        diff = (a[0].transpose(1, 2) - b["0.weight"].float()).abs().max() / b[
            "0.weight"
        ].abs().max()
        rows.append({"net": f"784-{net}-10", "K": k, "precision": precision,
                     "hand": f"{t_hand:.1f}", "func": f"{t_func:.1f}",
                     "ratio": f"{t_func / t_hand:.2f}",
                     "diff": f"{float(diff):.1e}"})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nets", nargs="+", default=["200-200", "800-800"])
    args = parser.parse_args()
    pin_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 784, generator=g)
    y = torch.randint(0, 10, (100,), generator=g)
    rows = [
        r for net in args.nets for r in measure_net(net, args.k, args.steps, args.repeats, x, y)
    ]
    print_table(
        f"ms per gradient step of K runs (B = 100), {args.threads} threads, median of "
        f"{args.repeats} x {args.steps} steps",
        rows,
        [("net", "net"), ("K", "K"), ("precision", "precision"), ("hand", "hand-written ms"),
         ("func", "torch.func ms"), ("ratio", "torch.func / hand"),
         ("diff", "max rel. diff of 0.weight grads")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
