"""Where a training iteration's time goes, beside the arithmetic limit of its matmuls.

    .venv/bin/python benchmarks/profile_step.py [--iters 200] [--threads 1] [--stacks 1 16]
        [--archs 400-400 800-800] [--batches 100 128] [--precision fp32 bf16]
        [--steps eager compiled]

For each architecture (784-H-H-10), mini-batch size B, precision and stack size K, the stacked
engine's iteration (:func:`masq.stacked.train_stacked`, what grids run; K = 1 is one run of
it) is timed as a whole over ``--iters`` iterations on MNIST-sized random data, and each part
alone over as many:

- gather: the mini-batch rows ``x[idx], y[idx]``;
- forward: the K forward passes (batched matmuls, ReLU, logits);
- backward: :func:`masq.stacked.loss_grads` (forward, softmax and back-propagation) minus
  the forward;
- penalty: the EWC gradient λF ⊙ (θ − θ*) over the stacked parameters;
- Adam: :class:`masq.stacked.StackedAdam`'s step without the penalty; with ``--steps
  compiled`` the compiled step (``masq grid --compile-step``), which does both at once: its
  time is the Adam column's and the penalty column is 0;
- evaluation: the per-iteration share of evaluating 15,000 images (a test and a validation
  set) every 500 iterations;
- rest: the whole iteration (with the evaluation share) minus the parts.

The limit is the iteration's matmul arithmetic, 2·B·K·(2·Σ_l in_l·out_l + Σ_{l>1} in_l·out_l)
floating-point operations (forward, weight gradients, input gradients below the first
layer), at the rate measured here for a [B, H] × [H, H] product in the precision.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch

from _common import pin_threads, print_table
from masq import stacked
from masq.consolidation.penalty import quadratic_grad_
from masq.models import mlp
from masq.stacked.model import Workspace, forward, loss_grads, stack_state
from masq.training.loop import phase_indices

EVAL_IMAGES, EVAL_EVERY = 15_000, 500


def _per_call(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call of ``fn`` (after two warm-up calls), mean of ``iters`` calls."""
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def matmul_rate(batch: int, width: int, dtype: torch.dtype) -> float:
    """FLOP/s of a [batch, width] × [width, width] product in ``dtype`` on this machine."""
    a = torch.rand(batch, width).to(dtype)
    b = torch.rand(width, width).to(dtype)
    out = torch.empty(batch, width, dtype=dtype)
    seconds = _per_call(lambda: torch.mm(a, b, out=out), 200)
    return 2 * batch * width * width / seconds


def flops(sizes: list[int], batch: int, k: int) -> float:
    """Matmul FLOPs of one iteration (module docstring)."""
    pairs = list(itertools.pairwise(sizes))
    macs = 2 * sum(i * o for i, o in pairs) + sum(i * o for i, o in pairs[1:])
    return 2.0 * batch * k * macs


def profile(
    hidden: tuple[int, ...], batch: int, precision: str, k: int, iters: int, step_kind: str
) -> dict:
    """The parts of one iteration in milliseconds (module docstring)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(12_000, 784, generator=gen), torch.randint(0, 10, (12_000,), generator=gen)
    x_eval, y_eval = x[:EVAL_IMAGES], y[:EVAL_IMAGES]
    state = {key: v.detach().clone() for key, v in mlp(hidden, seed=0).state_dict().items()}
    model = stack_state(state, k)
    anchors = [p[:1].clone() for p in model.params]
    lam_f = [torch.rand_like(p) * 1e-3 for p in model.params]
    ws = Workspace.create(model, batch, dtype)
    compiled = step_kind == "compiled"
    optimizer = stacked.StackedAdam.create(model, [1e-4] * k, compiled=compiled)
    order = phase_indices(x.shape[0], batch, iters + 2, gen)
    idx = order[0]
    xb, yb = x[idx], y[idx]
    scratch = [torch.empty_like(p) for p in model.params]

    def step() -> None:
        i = int(torch.randint(0, len(order), (1,)))
        grads = loss_grads(model, ws, x[order[i]], y[order[i]])
        optimizer.step(model.params, grads, lam_f, anchors)

    def penalty() -> None:
        for p, g, lf, a, tmp in zip(model.params, ws.grads, lam_f, anchors, scratch, strict=True):
            quadratic_grad_([g], [p], [a.expand_as(p)], [lf], [tmp])

    parts = {
        "gather": _per_call(lambda: (x[idx], y[idx]), iters),
        "forward": _per_call(lambda: forward(model, xb, dtype), iters),
        "fwd+bwd": _per_call(lambda: loss_grads(model, ws, xb, yb), iters),
        "penalty": 0.0 if compiled else _per_call(penalty, iters),
        "Adam": _per_call(
            lambda: optimizer.step(model.params, ws.grads, *((lam_f, anchors) if compiled else ())),
            iters,
        ),
    }
    if compiled and not optimizer.compiled:
        raise SystemExit("the compiled step failed here (see the warning above)")
    eval_s = _per_call(lambda: stacked.stacked_correct(model, x_eval, y_eval, dtype), 2)
    parts["evaluation"] = eval_s / EVAL_EVERY
    total = _per_call(step, iters) + parts["evaluation"]
    parts["backward"] = parts.pop("fwd+bwd") - parts["forward"]
    parts["rest"] = total - sum(parts.values())
    sizes = [784, *hidden, 10]
    limit = flops(sizes, batch, k) / matmul_rate(batch, max(hidden), dtype)
    row = {"net": "-".join(map(str, sizes)), "B": batch, "precision": precision, "K": k}
    row |= {"step": step_kind}
    row |= {f"{name} (ms)": 1e3 * parts[name] for name in PARTS}
    row |= {
        "total (ms)": 1e3 * total,
        "per run (ms)": 1e3 * total / k,
        "limit (ms)": 1e3 * limit,
        "total / limit": total / limit,
    }
    return row


PARTS = ("gather", "forward", "backward", "penalty", "Adam", "evaluation", "rest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--archs", nargs="+", default=["400-400", "800-800"])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 128])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", nargs="+", default=["eager"], choices=["eager", "compiled"])
    args = parser.parse_args()
    pin_threads(args.threads)
    rows = [
        profile(tuple(int(h) for h in arch.split("-")), batch, precision, k, args.iters, kind)
        for arch in args.archs
        for batch in args.batches
        for precision in args.precision
        for k in args.stacks
        for kind in args.steps
    ]
    title = (
        f"one iteration of the stacked engine, ms (torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.iters} iterations per part)"
    )
    print_table(title, rows, [(key, key) for key in rows[0]])


if __name__ == "__main__":
    main()
