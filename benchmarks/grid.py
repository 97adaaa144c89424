"""Throughput of the paper grid's D2 phase: stacked re-training vs one run at a time.

    .venv/bin/python benchmarks/grid.py [--iters 200] [--threads 1] [--archs 200-200 800-800]

For each architecture, the 16 (ε2, λ) re-training runs that share one D1 state are timed
(a) one by one, the code path of ``masq run`` / ``--stack 1`` (``train.train_task`` with the
EWC penalty, fused Adam), and (b) as one stacked model (``masq.stacked``, K = 16). A few
hundred iterations are measured on MNIST-sized random data and extrapolated to 5,000
iterations plus the evaluations (D5-5 test sets, 10,000 images, every ``--eval-every``
iterations); evaluation is timed separately. Then the whole paper grid (3 SLTs, 36
architectures, one seed) is extrapolated from the calibration of ``masq grid --dry-run``.
Numbers are per worker process with ``--threads`` torch threads; "machine" assumes
cores / threads workers in parallel (what ``masq grid`` runs by default), i.e. perfect scaling.
"""

from __future__ import annotations

import argparse
import time

import torch

from masq import grid as search
from masq import stacked
from masq import training as train
from masq.consolidation import ewc
from masq.models import mlp

ITERS = 5000
K = 16


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def one_by_one(
    hidden: tuple[int, ...], x: torch.Tensor, y: torch.Tensor, iters: int, runs: int
) -> float:
    """Seconds per iteration of one run (train_task with the EWC penalty), mean of ``runs``."""
    base = mlp(hidden, seed=0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    importance = {k: torch.rand_like(v) * 1e-3 for k, v in state.items()}
    total = 0.0
    for r in range(runs):
        model = mlp(hidden, seed=0)
        model.load_state_dict(state)
        anchor = ewc.anchor(model, importance)
        lam = [0.0, 100.0, 1000.0, 10000.0][r % 4]

        def penalty(
            m: torch.nn.Module, lam: float = lam, anchor: ewc.Anchor = anchor
        ) -> torch.Tensor:
            return ewc.penalty(m, anchor, lam)

        cfg = train.TrainConfig(lr=1e-4, iters=iters, batch_size=100, eval_every=10**9, seed=r)
        start = time.perf_counter()
        train.train_task(model, (x, y), cfg, penalty=penalty if lam > 0 else None)
        total += time.perf_counter() - start
    return total / runs / iters


def stacked_iter(hidden: tuple[int, ...], x: torch.Tensor, y: torch.Tensor, iters: int) -> float:
    """Seconds per iteration of a stack of K runs."""
    state = {k: v.clone() for k, v in mlp(hidden, seed=0).state_dict().items()}
    importance = {k: torch.rand_like(v) * 1e-3 for k, v in state.items()}
    lams = [0.0, 100.0, 1000.0, 10000.0] * (K // 4)
    lrs = [lr for lr in (1e-3, 1e-4, 1e-5, 1e-6) for _ in range(4)]
    start = time.perf_counter()
    stacked.train_stacked(
        state,
        (x, y),
        lrs=lrs,
        lams=lams,
        importances=[importance] * K,
        iters=iters,
        batch_size=100,
        eval_every=10**9,
        seed=0,
    )
    return (time.perf_counter() - start) / iters


def eval_seconds(hidden: tuple[int, ...], sets: dict, k: int) -> float:
    """Seconds of one evaluation of ``sets`` by one model (k=1, train.eval_counts) or a stack."""
    state = mlp(hidden, seed=0).state_dict()
    if k == 1:
        model = mlp(hidden, seed=0)
        fn = lambda: train.eval_counts(model, sets)  # noqa: E731
    else:
        s = stacked.stack_state(state, k)
        fn = lambda: stacked.stacked_accuracies(s, sets, {})  # noqa: E731
    fn()
    start = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - start) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=200, help="measured iterations per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one worker)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--archs", nargs="+", default=["200-200", "800-800"])
    parser.add_argument("--no-grid", action="store_true", help="skip the paper-grid estimate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cores = search.cpu_count()
    workers = max(1, cores // args.threads)
    x, y = _data(27_500, 0)  # D5-5's D2 training set size
    sets = {"D1": _data(5_000, 1), "D2": _data(5_000, 2)}  # D5-5's test sets
    n_evals = len(train.eval_iterations(ITERS, args.eval_every))
    print(
        f"# D2 re-training, {args.threads} thread(s) per worker, {cores} cores -> {workers} "
        f"worker(s); measured {args.iters} iterations, extrapolated to {ITERS} iterations + "
        f"{n_evals} evaluations of 10,000 images (eval every {args.eval_every})\n"
    )
    print(
        "| net | mode | ms / iteration / run | eval s / run | s / run (extrap.) | "
        "eval % | runs / hour / worker | runs / hour (machine) | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        hidden = tuple(int(h) for h in arch.split("-"))
        name = f"784-{arch}-10"
        t_one = one_by_one(hidden, x, y, args.iters, runs=2)
        t_stack = stacked_iter(hidden, x, y, args.iters) / K
        e_one = eval_seconds(hidden, sets, 1) * n_evals
        e_stack = eval_seconds(hidden, sets, K) / K * n_evals
        base = None
        for mode, t_it, e in (("one by one", t_one, e_one), (f"stacked K={K}", t_stack, e_stack)):
            per_run = ITERS * t_it + e
            rph = 3600 / per_run
            base = base or rph
            print(
                f"| {name} | {mode} | {1e3 * t_it:.2f} | {e:.1f} | {per_run:.0f} | "
                f"{100 * e / per_run:.0f} | {rph:.1f} | {workers * rph:.1f} | "
                f"{rph / base:.2f}x |"
            )
    if args.no_grid:
        return
    groups = search.plan(search.expand(search.load_preset("paper")))
    print(
        f"\n# the whole paper grid (3 SLTs x 36 architectures x 16 runs, one seed), "
        f"extrapolated from a calibration ({workers} worker(s) x {args.threads} thread(s))\n"
    )
    print("| D2 mode | total | D1 training | importance | D2 re-training | evaluation share |")
    print("|---|---|---|---|---|---|")
    for stack in (K, 1):
        est = search.estimate(groups, stack, workers=workers, threads=args.threads)
        mode = f"stacked K={stack}" if stack > 1 else "one by one"
        print(
            f"| {mode} | {est.total / 3600:.2f} h | {est.d1 / 3600:.2f} h | "
            f"{est.importance / 3600:.2f} h | {est.d2 / 3600:.2f} h | "
            f"{100 * est.evaluation / est.total:.0f} % |"
        )


if __name__ == "__main__":
    main()
