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
    AdamMoments,
    TrainConfig,
    adam_moments,
    fused_adam_available,
    load_adam_moments,
    make_adam,
    minibatch_indices,
    phase_indices,
    train_task,
)

__all__ = [
    "DEFAULT_EVAL_EVERY",
    "AdamMoments",
    "TrainConfig",
    "accuracies",
    "adam_moments",
    "eval_counts",
    "eval_iterations",
    "fused_adam_available",
    "load_adam_moments",
    "make_adam",
    "minibatch_indices",
    "model_device",
    "phase_indices",
    "train_task",
]
