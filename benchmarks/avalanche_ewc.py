"""masq against Avalanche 0.6.0's EWC on the same job: wall time and peak memory, interleaved.

Usage (Avalanche lives in its own virtual environment, never in masq's)::

    python -m venv /path/to/avalanche-venv
    /path/to/avalanche-venv/bin/pip install torch==2.13.0 avalanche-lib==0.6.0
    # (pin torch with a constraints file holding `torch==2.13.0` if pip wants to replace it)
    python benchmarks/avalanche_ewc.py --avalanche-python /path/to/avalanche-venv/bin/python \\
        [--iters 500] [--rounds 3] [--lam 1000] [--threads 1] [--precision fp32 bf16] \\
        [--fisher empirical|batched] [--avalanche-adam masq|default]

Run it with masq's interpreter (the one that has masq and MNIST). It prints a Markdown table:
per precision and side the median, min and max wall seconds of the whole job over ``--rounds``
runs, the Fisher pass's seconds, the peak RSS and its rise over the process's RSS before the
job, the masq/Avalanche ratio of the medians, and the final test accuracies of both (D1, D2 and
all ten classes), which show that the two sides did the same job.

The job, identical on both sides: D5-5 class-incremental (task 1 = MNIST digits 0-4, task 2 =
digits 5-9, one 10-unit head), an MLP 784-800-800-10 (ReLU) from the SAME initial weights
(masq's, handed over), Adam (fresh state per task) at ``--lr1`` on task 1 and ``--lr2`` on task
2, mini-batches of 100, ``--iters`` steps per task, then EWC: after task 1 the diagonal
empirical Fisher F on ALL of task 1's training data, and on task 2 the loss
CE + (λ/2) Σ F (θ − θ1)² with λ = ``--lam`` (Avalanche's plugin adds λ' Σ F (θ − θ1)², so it
gets λ' = λ/2). Evaluation: both test sets at the start and the end of each task (4 times, as
masq's curve with ``eval_every`` = iters records); nothing else is logged.

What is measured: each run is a fresh child process (masq's interpreter for masq, the
``--avalanche-python`` one for Avalanche) with ``--threads`` torch/OpenMP threads; the parent
writes the tasks (masq's train/test tensors, float32 [N, 784] in [0, 1]) and the initial
weights to a temporary .pt file, and the Avalanche child loads it (it imports nothing from masq
and downloads nothing). The timed region is the job alone: data already in memory; building the
model (and Avalanche's strategy), training, the Fisher pass and the evaluations. Peak RSS is
getrusage's ru_maxrss after resetting the kernel's peak mark just before the job (Linux).

How the two sides are matched:

- Steps: masq draws exactly ``--iters`` batches of 100 per task (reshuffling each epoch).
  Avalanche counts epochs, so its train loader gets ``drop_last=True`` (every batch 100),
  ``train_epochs = ceil(iters / (n_task // 100))`` and a plugin calls ``stop_training()``
  after the ``iters``-th step: exactly ``iters`` optimizer steps per experience.
- Learning rates: the optimizer's lr is set to ``--lr2`` between the experiences and its state
  is reset (``strategy.train(..., reset_optimizer_state=True)``), as masq's fresh Adam per task.
  ``--avalanche-adam masq`` (default) gives Avalanche the same Adam kernel masq uses (fused on
  the CPU from torch 2.4); ``default`` gives it torch's default (for-each) Adam.
- The strategy is ``SupervisedTemplate`` with a subclass of Avalanche's ``EWCPlugin`` (what
  ``avalanche.training.EWC`` is, with the stock plugin): the subclass skips the importance pass
  after the LAST experience (stock Avalanche computes one that nothing uses; masq does not) and
  sets the pass's batch size. ``--fisher empirical`` (default): masq's per-sample empirical
  Fisher (fisher_labels="empirical"); Avalanche's stock loop at batch size 1, which makes its
  "squared batch gradient, averaged over batches" exactly the per-sample empirical Fisher.
  ``--fisher batched``: both compute (1/K) Σ_b ḡ_b² over batches of 100 (masq's
  fisher_labels="batched", masq_batch=100; Avalanche's stock pass at train_mb_size=100).
- bf16: masq's precision="bf16"; Avalanche's strategy ``forward`` runs under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` (training and evaluation; logits cast to
  float32 before the loss, as masq does). The Fisher pass is float32 on both sides.

Left different (each library's own way): masq adds the EWC gradient directly, Avalanche adds
the penalty to the loss and back-propagates it; Avalanche reads mini-batches sample by sample
through its datasets and a DataLoader, masq indexes whole tensors; the mini-batch orders
differ (different shuffling), so accuracies agree closely, not to the digit.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# stdlib only at import: the Avalanche child (its own environment, no masq) loads it too
from _common import emit, measure, pin_threads, print_table, run_child

BATCH = 100
HIDDEN = (800, 800)
SIDES = ("masq", "avalanche")


# ------------------------------------------------------------------------ the masq child


def masq_config(args: argparse.Namespace, precision: str) -> Any:
    """The job as masq's RunConfig."""
    from masq.config import RunConfig

    batched = args.fisher == "batched"
    return RunConfig(
        slt="D5-5",
        seed=args.seed,
        hidden=HIDDEN,
        iters1=args.iters,
        iters2=args.iters,
        lr1=args.lr1,
        lr2=args.lr2,
        batch_size=BATCH,
        eval_every=args.iters,  # evaluation at 0 and the end of each task only
        importance="fisher",
        fisher_labels="batched" if batched else "empirical",
        masq_batch=BATCH if batched else 1000,
        lam=args.lam,
        precision=precision,
    )


def masq_child(args: argparse.Namespace) -> None:
    """One masq run of the job; prints its result line."""
    pin_threads(args.threads)
    import torch

    import masq
    from masq.protocol import make_tasks, run

    config = masq_config(args, args.child_precision)
    tasks = make_tasks(config)  # data loaded before the timed region
    stats, result = measure(lambda: run(config, tasks=tasks, keep_weights=False))
    last = result.last
    emit(stats | {
        "fisher_s": sum(result.timings.get("importance", [])),
        "acc_d1": last["D1"], "acc_d2": last["D2"], "acc_all": last["D1∪D2"],
        "version": f"masq {masq.__version__}, torch {torch.__version__}",
    })  # fmt: skip


# ------------------------------------------------------------------- the Avalanche child


def avalanche_child(args: argparse.Namespace) -> None:
    """One Avalanche run of the job on the tasks in ``args.data``; prints its result line."""
    pin_threads(args.threads)
    import warnings

    import avalanche
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, SupervisedPlugin
    from avalanche.training.templates import SupervisedTemplate
    from torch import nn

    warnings.filterwarnings("ignore", message="No loggers specified")
    data = torch.load(args.data, weights_only=True)
    n_tasks = len(data["train"])

    def dataset(x: torch.Tensor, y: torch.Tensor) -> Any:
        return _make_taskaware_tensor_classification_dataset(x, y, task_labels=0, targets=y)

    bench = benchmark_from_datasets(
        train=[dataset(x, y) for x, y in data["train"]],
        test=[dataset(x, y) for x, y in data["test"]],
    )
    bf16 = args.child_precision == "bf16"
    fisher_batch = 1 if args.fisher == "empirical" else BATCH
    fisher_seconds: list[float] = []

    class Strategy(SupervisedTemplate):
        def forward(self) -> torch.Tensor:
            if not bf16:
                return super().forward()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().forward().float()

    class Ewc(EWCPlugin):
        """The stock plugin; no importance after the last experience, the pass's batch set."""

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            if strategy.clock.train_exp_counter == n_tasks - 1:
                return
            start = time.perf_counter()
            super().after_training_exp(strategy, **kwargs)
            fisher_seconds.append(time.perf_counter() - start)

        def compute_importances(self, model: Any, criterion: Any, optimizer: Any,
                                dataset: Any, device: Any, batch_size: int,
                                num_workers: int = 0) -> Any:  # fmt: skip
            return super().compute_importances(
                model, criterion, optimizer, dataset, device, fisher_batch, num_workers
            )

    class StopAfter(SupervisedPlugin):
        """Stop an experience's training after exactly ``iters`` optimizer steps."""

        def __init__(self, iters: int) -> None:
            super().__init__()
            self.iters, self.done = iters, 0

        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self.done = 0

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.done += 1
            if self.done >= self.iters:
                strategy.stop_training()

    stop = StopAfter(args.iters)

    def job() -> dict[str, float]:
        torch.manual_seed(args.seed)  # the loader's shuffling
        widths = (784, *HIDDEN, 10)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers += [nn.Linear(widths[i], widths[i + 1])]
            layers += [nn.ReLU()] if i < len(widths) - 2 else []
        model = nn.Sequential(*layers)
        model.load_state_dict(data["init"])
        fused = args.avalanche_adam == "masq" and bool(data["fused_adam"])
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr1, fused=fused or None)
        strategy = Strategy(
            model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
            train_mb_size=BATCH, train_epochs=1, eval_mb_size=1000, device="cpu",
            plugins=[Ewc(args.lam / 2), stop], eval_every=-1,
            evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                       loggers=[]),
        )  # fmt: skip
        metrics: dict[str, float] = {}
        for t, exp in enumerate(bench.train_stream):
            steps_per_epoch = len(exp.dataset) // BATCH
            strategy.train_epochs = math.ceil(args.iters / steps_per_epoch)
            lr = args.lr1 if t == 0 else args.lr2
            for group in strategy.optimizer.param_groups:
                group["lr"] = lr
            strategy.eval(bench.test_stream)
            strategy.train(exp, eval_streams=[], drop_last=True, reset_optimizer_state=True)
            # exactly `iters` steps, from a fresh Adam state, at this task's lr:
            steps = {int(st["step"]) for st in strategy.optimizer.state.values()}
            lrs = {group["lr"] for group in strategy.optimizer.param_groups}
            if stop.done != args.iters or steps != {args.iters} or lrs != {lr}:
                raise RuntimeError(f"experience {t}: {stop.done} steps, Adam's {steps}, lr "
                                   f"{lrs}; wanted {args.iters} steps at lr {lr}")  # fmt: skip
            metrics = strategy.eval(bench.test_stream)
        return metrics

    stats, metrics = measure(job)

    def metric(kind: str, end: str = "") -> float:
        """The accuracy ``Top1_Acc_{kind}/eval_phase/test_stream[/Task000]...{end}``."""
        key = [k for k in metrics if k.startswith(f"Top1_Acc_{kind}/eval_phase/test_stream")
               and k.endswith(end)]  # fmt: skip
        if len(key) != 1:
            raise RuntimeError(f"no single {kind} accuracy {end!r} in {sorted(metrics)}")
        return float(metrics[key[0]])

    emit(stats | {
        "fisher_s": sum(fisher_seconds),
        "acc_d1": metric("Exp", "/Exp000"), "acc_d2": metric("Exp", "/Exp001"),
        "acc_all": metric("Stream"),
        "version": f"avalanche {avalanche.__version__}, torch {torch.__version__}",
    })  # fmt: skip


# ------------------------------------------------------------------------------ parent


def write_data(args: argparse.Namespace, path: Path) -> None:
    """The tasks' train/test tensors and the initial weights, as masq makes them, to ``path``
    (for the Avalanche child)."""
    import torch

    from masq.protocol import build_model, make_tasks
    from masq.training.loop import fused_adam_available

    config = masq_config(args, "fp32")
    tasks = make_tasks(config)
    data = {
        "train": [task.train for task in tasks],
        "test": [task.test for task in tasks],
        "init": build_model(config, tasks).state_dict(),
        "fused_adam": fused_adam_available(torch.device("cpu")),
    }
    torch.save(data, path)


def child_argv(args: argparse.Namespace, side: str, precision: str, data: Path) -> list[str]:
    """The command line of one child run."""
    argv = [str(Path(__file__).resolve()), "--child", side, "--child-precision", precision]
    argv += ["--iters", str(args.iters), "--lam", repr(args.lam), "--lr1", repr(args.lr1)]
    argv += ["--lr2", repr(args.lr2), "--threads", str(args.threads), "--seed", str(args.seed)]
    argv += ["--fisher", args.fisher, "--avalanche-adam", args.avalanche_adam]
    return argv + (["--data", str(data)] if side == "avalanche" else [])


def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]], precisions: Sequence[str]
              ) -> list[dict[str, Any]]:  # fmt: skip
    """One table row per precision and side."""
    rows = []
    for precision in precisions:
        medians = {s: statistics.median(r["seconds"] for r in runs[precision, s]) for s in SIDES}
        for side in SIDES:
            done = runs[precision, side]
            seconds = [r["seconds"] for r in done]
            rows.append({
                "precision": precision, "side": side, "runs": len(done),
                "median": medians[side], "min": min(seconds), "max": max(seconds),
                "fisher": statistics.median(r["fisher_s"] for r in done),
                "peak": statistics.median(r["peak_rss_mib"] for r in done),
                "delta": statistics.median(r["delta_mib"] for r in done),
                "ratio": medians["masq"] / medians["avalanche"],
                "acc_d1": done[-1]["acc_d1"], "acc_d2": done[-1]["acc_d2"],
                "acc_all": done[-1]["acc_all"],
            })  # fmt: skip
    return rows


COLUMNS = [
    ("precision", "precision"), ("side", "side"), ("runs", "runs"),
    ("median", "median wall s"), ("min", "min s"), ("max", "max s"),
    ("fisher", "Fisher s"), ("peak", "peak RSS MiB"), ("delta", "RSS rise MiB"),
    ("ratio", "masq/Avalanche"), ("acc_d1", "acc D1"), ("acc_d2", "acc D2"),
    ("acc_all", "acc D1∪D2"),
]  # fmt: skip


def parent(args: argparse.Namespace) -> None:
    """Interleaved rounds (masq, Avalanche, masq, ...) per precision; the table."""
    if not args.avalanche_python:
        raise SystemExit("give --avalanche-python: the interpreter of Avalanche's environment")
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="masq-avalanche-") as tmp:
        data = Path(tmp) / "d5-5.pt"
        write_data(args, data)
        for precision in args.precision:
            for r in range(args.rounds):
                for side in SIDES:
                    python = sys.executable if side == "masq" else args.avalanche_python
                    argv = child_argv(args, side, precision, data)
                    result = run_child(argv, args.threads, python)
                    runs.setdefault((precision, side), []).append(result)
                    versions[side] = result["version"]
                    print(f"{precision} round {r + 1}/{args.rounds} {side}: "
                          f"{result['seconds']:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    title = (
        f"EWC on D5-5, MLP 784-{'-'.join(map(str, HIDDEN))}-10, {args.iters} steps of {BATCH} "
        f"per task, lr {args.lr1:g}/{args.lr2:g}, λ {args.lam:g}, {args.fisher} Fisher, "
        f"{args.threads} thread(s), {args.rounds} interleaved round(s); "
        f"{versions['masq']}; {versions['avalanche']}"
    )
    print_table(title, summarize(runs, args.precision), COLUMNS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--avalanche-python", help="python of the environment with avalanche-lib")
    p.add_argument("--iters", type=int, default=500, help="optimizer steps per task")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each side")
    p.add_argument("--lam", type=float, default=1000.0, help="EWC λ (masq's convention)")
    p.add_argument("--lr1", type=float, default=1e-3, help="Adam lr on task 1")
    p.add_argument("--lr2", type=float, default=1e-4, help="Adam lr on task 2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    p.add_argument("--fisher", choices=("empirical", "batched"), default="empirical",
                   help="empirical: per-sample (Avalanche's pass at batch 1); batched: squared "
                        "batch-mean gradients at batch 100 (Avalanche's stock pass)")  # fmt: skip
    p.add_argument(
        "--avalanche-adam",
        choices=("masq", "default"),
        default="masq",
        help="masq: the Adam kernel masq uses (fused on the CPU); default: torch's",
    )
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--child-precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--iters, --rounds and --threads must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.child == "masq":
        masq_child(args)
    elif args.child == "avalanche":
        avalanche_child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
