"""Stacked T-task re-training against one run at a time, end to end through the protocol.

    .venv/bin/python benchmarks/stacked_tasks.py [--iters 2000] [--runs 8] [--threads 1]
        [--precision fp32 bf16] [--scenario task] [--compile-step]

The protocol of van de Ven & Tolias (2019) on split MNIST (5 tasks of 2 digits, 784-400-400-10,
Adam lr 1e-3, B = 128, ``--iters`` iterations per task, evaluation every 500 iterations on
every task's test and validation set; the ``vdv2019-split`` preset's settings). Task 1 is
trained once; then the ``--runs`` runs of an EWC λ sweep (Fisher of the predicted label, one
anchor per task) continue from it for tasks 2-5 (a) one by one
(:func:`masq.protocol.continue_run`, what ``--stack 1`` runs) and (b) as one stack
(:func:`masq.protocol.continue_stacked`). Both include the importance pass after tasks 2-4
(run by run in both) and every evaluation. The table prints the wall time of each, the
speed-up and the largest difference of the final average accuracy between the two (float
rounding in another order). With ``--compile-step`` the stack is timed a second time with the
compiled step (``masq grid --compile-step``; its one-time compile included).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _common import pin_threads, print_table
from masq import protocol
from masq.config import RunConfig
from masq.runtime import COMPILE_ENV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000, help="iterations per task")
    parser.add_argument("--runs", type=int, default=8, help="K: runs of the λ sweep")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--scenario", default="task")
    parser.add_argument("--compile-step", action="store_true", help="also time the stack compiled")
    args = parser.parse_args()
    pin_threads(args.threads)
    rows = []
    for precision in args.precision:
        base = RunConfig(
            slt="D2-2-2-2-2",
            scenario=args.scenario,
            hidden=(400, 400),
            lr1=1e-3,
            lr2=1e-3,
            iters1=args.iters,
            iters2=args.iters,
            batch_size=128,
            eval_every=500,
            eval_val=True,
            importance="fisher",
            fisher_labels="predicted",
            precision=precision,
        )
        lams = [10.0 ** (i - 1) for i in range(args.runs)]
        configs = [base.with_(lam=lam) for lam in lams]
        tasks = protocol.make_tasks(base)
        d1 = protocol.train_first(base, tasks)
        imp, seconds = protocol.compute_importance(base, d1, tasks)
        start = time.perf_counter()
        alone = [
            protocol.continue_run(c, d1, imp, tasks, seconds, keep_weights=False) for c in configs
        ]
        t_alone = time.perf_counter() - start
        start = time.perf_counter()
        stacked = protocol.continue_stacked(configs, d1, [imp] * len(configs), tasks)
        t_stacked = time.perf_counter() - start
        key = "D1∪D2∪D3∪D4∪D5"
        timed = [("eager", t_stacked, stacked)]
        if args.compile_step:
            os.environ[COMPILE_ENV] = "1"
            start = time.perf_counter()
            again = protocol.continue_stacked(configs, d1, [imp] * len(configs), tasks)
            timed.append(("compiled", time.perf_counter() - start, again))
            del os.environ[COMPILE_ENV]
        for step, seconds_stacked, results in timed:
            diff = max(abs(a.last[key] - b.last[key]) for a, b in zip(alone, results, strict=True))
            rows.append(
                {
                    "precision": precision,
                    "K": len(configs),
                    "step": step,
                    "one by one (s)": f"{t_alone:.1f}",
                    "stacked (s)": f"{seconds_stacked:.1f}",
                    "speed-up": f"{t_alone / seconds_stacked:.2f}x",
                    "per run, stacked (s)": f"{seconds_stacked / len(configs):.1f}",
                    "max abs Δ ACC (pp)": f"{100 * diff:.2f}",
                }
            )
    title = (
        f"split MNIST, {args.scenario}-incremental, 784-400-400-10, B = 128, {args.iters} "
        f"iterations per task, tasks 2-5 of {args.runs} EWC runs; torch {torch.__version__}, "
        f"{args.threads} thread(s)"
    )
    print_table(title, rows, [(k, k) for k in rows[0]])


if __name__ == "__main__":
    main()
