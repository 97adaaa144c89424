"""Evaluation: when (the schedule) and how (correct counts, accuracies of sets and unions).

Schedules (:func:`eval_iterations`; the iteration 0 and the last one are always included):

- ``every``: every ``eval_every`` iterations (default 250);
- ``paper``: after every iteration, as the paper measured its "best" criterion;
- ``dense-early``: every 2 iterations up to 100, every 20 up to 1,000, every 100 after that
  (136 points in a 5,000-iteration phase instead of 21 or 5,001): early peaks of "best" are
  seen to 2 iterations, late ones to 100. Measured on 784-800-800-10 (benchmarks/precision.py,
  idle machine), one evaluation of 10,000 images costs 148 ms in fp32 (75 ms in bf16), about
  15 training iterations, so this schedule takes ≈ 37 % of a phase's time (every 250: 8 %,
  every iteration: 96 %).

Evaluation cost: one evaluation of the D5-5 test sets (10,000 images, forward only, large
batches) costs as much as 18-30 training iterations of the same net at B = 100 (measured for
784-800-800-10 on 2 busy CPU cores, torch 2.13: 161 ms against 8.8 ms per iteration in
benchmarks/train.py). The default ``eval_every = 250`` thus keeps evaluation at 7-11 % of the
training time (21 points per 5,000-iteration phase).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from masq.config import EvalSchedule, Precision, choice
from masq.errors import ConfigError
from masq.scenarios import head_bias
from masq.tasks import XY

DEFAULT_EVAL_EVERY = 250
# dense-early: (up to this iteration, every this many iterations), then DENSE_LATE_EVERY.
DENSE_EARLY: tuple[tuple[int, int], ...] = ((100, 2), (1000, 20))
DENSE_LATE_EVERY = 100


def eval_iterations(
    iters: int, eval_every: int, schedule: EvalSchedule | str = EvalSchedule.EVERY
) -> list[int]:
    """The iterations at which a curve is recorded (module docstring): always 0 and
    ``iters``; in between every ``eval_every`` ("every"), every iteration ("paper"), or the
    dense-early points."""
    schedule = choice(EvalSchedule, schedule, "eval_schedule")
    if schedule == EvalSchedule.PAPER:
        points = list(range(iters + 1))
    elif schedule == EvalSchedule.DENSE_EARLY:
        dense: set[int] = set()
        low = 0
        for stop, step in DENSE_EARLY:
            dense.update(range(low, min(stop, iters) + 1, step))
            low = stop
        dense.update(range(low, iters + 1, DENSE_LATE_EVERY))
        points = sorted(dense)
    else:
        points = list(range(0, iters + 1, eval_every))
    if points[-1] != iters:
        points.append(iters)
    return points


def autocast(device: torch.device, precision: Precision | str) -> torch.autocast:
    """The autocast context of ``precision`` on ``device``: bfloat16 matmuls for "bf16"
    (float32 weights; reductions such as the cross-entropy stay in float32), a disabled
    context for "fp32"."""
    precision = choice(Precision, precision, "precision")
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=precision == Precision.BF16
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def eval_counts(
    model: nn.Module,
    sets: Mapping[str, XY],
    batch_size: int = 10_000,
    precision: Precision | str = Precision.FP32,
    units: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, int]]:
    """{set name: (correct, total)} where correct = #{n : argmax model(x_n) == y_n}; for a set
    named in ``units`` (task-incremental: its task's output units) the argmax runs over those
    units only (the others' logits masked, :func:`masq.scenarios.head_bias`).

    Runs without autograd in chunks of ``batch_size`` on the model's device, in the run's
    ``precision``; the model's train/eval mode is restored afterwards.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        counts: dict[str, tuple[int, int]] = {}
        for name, (x, y) in sets.items():
            correct = torch.zeros((), dtype=torch.int64, device=device)
            mask = None if units is None else units.get(name)
            bias: Tensor | None = None  # the head bias of ``mask``, made at the first chunk
            for start in range(0, int(y.shape[0]), batch_size):
                xb = x[start : start + batch_size].to(device, non_blocking=True)
                yb = y[start : start + batch_size].to(device, non_blocking=True)
                with autocast(device, precision):
                    logits = model(xb)
                if mask is not None:
                    if bias is None:
                        bias = head_bias(mask, logits.shape[1], device)
                    logits = logits.float() + bias
                correct += (logits.argmax(dim=1) == yb).sum()
            counts[name] = (int(correct.item()), int(y.shape[0]))
    finally:
        model.train(was_training)
    return counts


def accuracies(
    counts: Mapping[str, tuple[int, int]], unions: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """acc(set) = correct / total for every set, and for each union U = (A, B, ...)
    acc(U) = (correct_A + correct_B + ...) / (total_A + total_B + ...); NaN for empty sets."""
    out = {name: _ratio(c, t) for name, (c, t) in counts.items()}
    for union, members in unions.items():
        missing = [m for m in members if m not in counts]
        if missing:
            raise ConfigError(f"union {union!r}: unknown sets {missing}; have {sorted(counts)}")
        out[union] = _ratio(sum(counts[m][0] for m in members), sum(counts[m][1] for m in members))
    return out


def _ratio(correct: int, total: int) -> float:
    return correct / total if total > 0 else float("nan")
