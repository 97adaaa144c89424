"""Training one task and evaluating it: :mod:`masq.training.loop` (Adam, mini-batches, the
loop with a visible penalty) and :mod:`masq.training.evaluate` (schedule, counts, accuracies)."""

from masq.training.evaluate import (
    DEFAULT_EVAL_EVERY,
    accuracies,
    eval_counts,
    eval_iterations,
    model_device,
)
from masq.training.loop import (
    TrainConfig,
    fused_adam_available,
    make_adam,
    minibatch_indices,
    phase_indices,
    train_task,
)

__all__ = [
    "DEFAULT_EVAL_EVERY",
    "TrainConfig",
    "accuracies",
    "eval_counts",
    "eval_iterations",
    "fused_adam_available",
    "make_adam",
    "minibatch_indices",
    "model_device",
    "phase_indices",
    "train_task",
]
