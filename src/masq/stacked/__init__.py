"""Batched re-training: K runs of one MLP trained at once as one stacked model.

Runs that share a starting state differ only in ε2 (``lr``), λ and the importance F. Here
they are trained together: every parameter gets a leading run dimension K, the K forward and
backward passes become batched matmuls (the first layer's input batch is shared by all K
runs), and Adam runs on the stacked tensors with a per-run learning rate. Run k computes
exactly what a separate :func:`masq.training.train_task` call computes, up to float rounding:

    loss_k   = CE(f(x_B; θ_k), y_B)          (mean over the mini-batch B, the same B for all k)
    g_k      = ∇ loss_k + λ_k F_k ⊙ (θ_k − θ*)      (the gradient of (λ_k/2) Σ F_k (θ_k − θ*)²)
    m_k      = β1 m_k + (1 − β1) g_k,   v_k = β2 v_k + (1 − β2) g_k²
    θ_k     -= ε2_k / (1 − β1^t) · m_k / (sqrt(v_k / (1 − β2^t)) + eps)     (torch.optim.Adam)

Rooms: :mod:`~masq.stacked.model` (stacked layout, forward, hand-written back-propagation,
evaluation), :mod:`~masq.stacked.adam` (the Adam step, PyTorch's fused kernel run by run
where this torch has it), :mod:`~masq.stacked.loop` (:func:`train_stacked`).
"""

from masq.stacked.adam import BETAS, EPS, StackedAdam
from masq.stacked.loop import lam_importance, train_stacked
from masq.stacked.model import (
    StackedMLP,
    Workspace,
    forward,
    linear_keys,
    loss_grads,
    stack_state,
    stack_states,
    stacked_accuracies,
    stacked_correct,
    task_losses,
    unstack,
)

__all__ = [
    "BETAS",
    "EPS",
    "StackedAdam",
    "StackedMLP",
    "Workspace",
    "forward",
    "lam_importance",
    "linear_keys",
    "loss_grads",
    "stack_state",
    "stack_states",
    "stacked_accuracies",
    "stacked_correct",
    "task_losses",
    "train_stacked",
    "unstack",
]
