"""Your own importance measure, registered from outside masq, run through `run` and a grid.

The measure here is the absolute value of the batch-mean gradient averaged over the pass,
Ω_k = (1/K) Σ_b |ḡ_bk| (a cheap cousin of MAS): one function and one `register_measure` line.
masq then runs it like its own measures: run ids, grid grouping and caches, the penalty
(λ/2) Σ Ω (θ − θ*)², records, tables and labels ("EWC+|grad|").

Run: .venv/bin/python examples/custom_measure.py [RESULTS_DIR]   (about a minute on 2 cores)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from masq import grid, importance, protocol
from masq.config import RunConfig
from masq.consolidation import method_label
from masq.tasks import XY


def grad_abs(model: nn.Module, data: XY, ctx: importance.MeasureContext) -> importance.Importance:
    """Ω_k = (1/K) Σ_b |∂ mean_{n∈b} CE(f(x_n), y_n) / ∂θ_k| over batches of ctx.batch_size.
    Evaluated in eval mode; the model is handed back as it was found."""
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for x, y in importance.batches(*data, ctx.batch_size):
        loss = F.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads, strict=True):
            sums[n] += g.abs()
        count += 1
    model.train(was_training)
    return {n: (s / count).to(params[n].dtype) for n, s in sums.items()}


importance.register_measure(
    importance.Measure("grad-abs", label="|grad|", compute=grad_abs, fields=("masq_batch",))
)

if __name__ == "__main__":
    small = {"slt": "D5-5", "hidden": (100,), "iters1": 300, "iters2": 300, "lr2": 1e-4,
             "eval_every": 100, "device": "cpu"}  # fmt: skip
    # one run through the protocol
    result = protocol.run(RunConfig(**small, importance="grad-abs", lam=1e4))
    print(f"{method_label(result.config)}: D1∪D2 last {result.last['D1∪D2']:.4f}")
    # a small grid beside the built-in measures: one task-1 training, one pass per measure
    axes = {**{k: (v,) for k, v in small.items() if k != "device"}, "device": "cpu"}
    g = grid.Grid(**axes, importance=("grad-abs", "fisher", "masq"), lam=(0.0, 1e2, 1e4))
    configs = grid.expand(g)
    out = sys.argv[1] if len(sys.argv) > 1 else "results/custom_measure"
    summary = grid.execute(configs, out, workers=1, progress=False)
    print(f"grid: {summary.done} runs now, {summary.skipped} stored before, into {out}")
    from masq.store import load

    runs = load(out)
    runs["method"] = [method_label(r) for r in runs.to_dict("records")]
    shown = runs.sort_values(["method", "lam"])[["method", "lam", "last.D1", "last.D1∪D2"]]
    print(shown.to_string(index=False))
