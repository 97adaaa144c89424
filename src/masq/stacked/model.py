"""The stacked layout of K MLPs, their forward pass, hand-written back-propagation and
evaluation (:mod:`masq.stacked`).

Layout: weights are stored transposed, ``[K, in, out]`` (so ``h @ W`` and every gradient
comes out of its matmul in the parameter's own layout), biases ``[K, out]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from masq.errors import ConfigError
from masq.scenarios import head_bias
from masq.tasks import XY
from masq.training import accuracies

LOOP_ELEMENTS = 1 << 16  # weight-gradient GEMMs run by run from this size (measured faster)
EVAL_ELEMENTS = 1 << 22  # at most this many hidden activations at once in evaluation

_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


@dataclass
class StackedMLP:
    """K MLPs (Linear/ReLU alternating, ReLU after every layer but the last) as stacked tensors.

    ``params`` is [W0, b0, W1, b1, ...]: weights ``[K, in, out]`` (transposed), biases
    ``[K, out]``; ``keys`` the matching ``nn.Sequential`` names ("0.weight", "0.bias", ...).
    """

    k: int
    params: list[Tensor]
    keys: list[str]

    @property
    def layers(self) -> int:
        return len(self.params) // 2


def linear_keys(state_dict: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """[(weight key, bias key)] of the Linear layers of an nn.Sequential MLP, in order."""
    indices: dict[int, set[str]] = {}
    for key in state_dict:
        match = _KEY.match(key)
        if not match:
            raise ConfigError(f"stacked: unexpected parameter {key!r}; expected an mlp() state")
        indices.setdefault(int(match.group(1)), set()).add(match.group(2))
    out = []
    for i in sorted(indices):
        if indices[i] != {"weight", "bias"}:
            raise ConfigError(f"stacked: layer {i} needs a weight and a bias")
        out.append((f"{i}.weight", f"{i}.bias"))
    return out


def stored_layout(tensor: Tensor) -> Tensor:
    """A weight [out, in] as [in, out] (a bias unchanged)."""
    return tensor.t() if tensor.ndim == 2 else tensor


def stack_state(
    state_dict: Mapping[str, Tensor], k: int, device: torch.device | None = None
) -> StackedMLP:
    """K copies of one MLP state (every run starts from it)."""
    return stack_states([state_dict] * k, device)


def stack_states(
    states: Sequence[Mapping[str, Tensor]], device: torch.device | None = None
) -> StackedMLP:
    """The MLP states ``states`` (same architecture) as one stacked model."""
    keys = [key for pair in linear_keys(states[0]) for key in pair]
    params = [
        torch.stack([stored_layout(s[key].detach()) for s in states])
        .to(device=device, dtype=torch.float32)
        .contiguous()
        for key in keys
    ]
    return StackedMLP(len(states), params, keys)


def unstack(model: StackedMLP, run: int) -> dict[str, Tensor]:
    """Run ``run``'s state dict (``nn.Sequential`` names and layouts, on the CPU)."""
    return {
        key: stored_layout(p[run]).detach().to("cpu", copy=True).contiguous()
        for key, p in zip(model.keys, model.params, strict=True)
    }


def compute_params(model: StackedMLP, dtype: torch.dtype) -> list[Tensor]:
    """The parameters in the matmuls' dtype: the float32 masters themselves, or bfloat16
    copies (one cast per step, as autocast casts a Linear's weight once per forward)."""
    if dtype == model.params[0].dtype:
        return model.params
    return [p.to(dtype) for p in model.params]


def forward(model: StackedMLP, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Logits [K, B, classes] of the K nets on the shared input x [B, in], the matmuls in
    ``dtype`` (float32 logits out)."""
    params = compute_params(model, dtype)
    h = x.to(dtype).unsqueeze(0).expand(model.k, *x.shape)
    for layer in range(model.layers):
        if layer > 0:
            h = torch.relu(h)
        w, b = params[2 * layer], params[2 * layer + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, w)
    return h.float()


def task_losses(model: StackedMLP, x: Tensor, y: Tensor) -> Tensor:
    """Σ_k CE_k, CE_k = mean over the batch of −log softmax(f_k(x))_y (run k's task loss);
    differentiable (the autograd reference of :func:`loss_grads`)."""
    logits = forward(model, x)
    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), y.repeat(k), reduction="sum") / b


@dataclass
class Workspace:
    """Buffers of one training step for mini-batches of ``batch`` (allocated once: fresh
    multi-megabyte tensors every step would cost page faults, not arithmetic)."""

    acts: list[Tensor]  # [K, B, out] per layer (post-ReLU for hidden layers; logits last)
    deltas: list[Tensor]  # [K, B, out] per layer: ∂(Σ_k loss_k)/∂(pre-activation)
    grads: list[Tensor]  # like model.params (float32)
    low_grads: list[Tensor]  # like model.params in the matmuls' dtype (bf16 only; else [])

    @classmethod
    def create(cls, model: StackedMLP, batch: int, dtype: torch.dtype = torch.float32) -> Workspace:
        """Activations and deltas in the matmuls' ``dtype``, gradients in float32."""
        p0 = model.params[0]
        acts = [p0.new_empty(model.k, batch, b.shape[-1], dtype=dtype) for b in model.params[1::2]]
        deltas = [torch.empty_like(a) for a in acts]
        grads = [torch.empty_like(p) for p in model.params]
        low = [torch.empty_like(p, dtype=dtype) for p in model.params] if dtype != p0.dtype else []
        return cls(acts, deltas, grads, low)


@torch.no_grad()
def loss_grads(
    model: StackedMLP, ws: Workspace, x: Tensor, y: Tensor, bias: Tensor | None = None
) -> list[Tensor]:
    """∇_θk CE_k of every run k (into ``ws.grads``), by hand-written back-propagation:

        z_l = a_{l-1} W_l + b_l,  a_l = relu(z_l),  a_0 = x (shared),  logits = z_L
        δ_L = (softmax(z_L) − onehot(y)) / B
        ∂W_l = a_{l-1}ᵀ δ_l,  ∂b_l = Σ_n δ_l,  δ_{l-1} = (δ_l W_lᵀ) ⊙ [a_{l-1} > 0]

    the gradient of the batch-mean cross-entropy, as autograd computes it (tested); with a
    head ``bias`` (task-incremental: −inf on the other tasks' units) the softmax runs over
    z_L + bias, so δ_L is exactly 0 on the masked units. The
    matmuls run in the workspace's dtype (bfloat16 for bf16 runs: the parameters cast once per
    step, the softmax in float32, the gradients returned in float32, as under autocast).
    """
    k, batch, layers = model.k, x.shape[0], model.layers
    dtype = ws.acts[0].dtype
    params = compute_params(model, dtype)
    grads = ws.low_grads or ws.grads
    x = x.to(dtype)
    h = x.unsqueeze(0).expand(k, *x.shape)
    for layer in range(layers):
        out = ws.acts[layer]
        w, b = params[2 * layer], params[2 * layer + 1]
        torch.baddbmm(b.unsqueeze(1), h, w, out=out)
        if layer < layers - 1:
            out.clamp_(min=0)
        h = out
    logits = ws.acts[-1].float()
    probs = torch.softmax(logits if bias is None else logits + bias, dim=2)
    probs[:, torch.arange(batch, device=x.device), y] -= 1.0
    probs.div_(batch)
    delta = ws.deltas[-1]
    delta.copy_(probs)
    for layer in reversed(range(layers)):
        below = x.unsqueeze(0).expand(k, *x.shape) if layer == 0 else ws.acts[layer - 1]
        grad_w = grads[2 * layer]
        # large on the CPU: one GEMM per run, no transposed copy (measured faster there); a
        # GPU runs every size as one batched GEMM
        if grad_w[0].numel() >= LOOP_ELEMENTS and grad_w.device.type == "cpu":
            for run in range(k):
                torch.mm(below[run].t(), delta[run], out=grad_w[run])
        else:
            torch.bmm(below.transpose(1, 2), delta, out=grad_w)
        torch.sum(delta, dim=1, out=grads[2 * layer + 1])
        if layer > 0:
            prev = ws.deltas[layer - 1]
            torch.bmm(delta, params[2 * layer].transpose(1, 2), out=prev)
            prev.mul_(below > 0)
            delta = prev
    if ws.low_grads:
        torch._foreach_copy_(ws.grads, ws.low_grads)
    return ws.grads


@torch.no_grad()
def stacked_correct(
    model: StackedMLP,
    x: Tensor,
    y: Tensor,
    dtype: torch.dtype = torch.float32,
    bias: Tensor | None = None,
) -> Tensor:
    """[K] int64: #{n : argmax f_k(x_n) == y_n} for every run k, in chunks, the matmuls in
    ``dtype`` (the argmax over f_k(x_n) + ``bias``: masked units never win)."""
    width = max(p.shape[-1] for p in model.params[1::2])
    chunk = max(1, EVAL_ELEMENTS // (model.k * width))
    correct = torch.zeros(model.k, dtype=torch.int64, device=model.params[0].device)
    for start in range(0, int(y.shape[0]), chunk):
        logits = forward(model, x[start : start + chunk], dtype)
        if bias is not None:
            logits = logits + bias
        correct += (logits.argmax(dim=2) == y[start : start + chunk]).sum(dim=1)
    return correct


def stacked_accuracies(
    model: StackedMLP,
    sets: Mapping[str, XY],
    unions: Mapping[str, Sequence[str]],
    dtype: torch.dtype = torch.float32,
    units: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, float]]:
    """Per run, :func:`masq.training.accuracies` of its counts on ``sets`` (and the unions),
    one batched pass of all K runs per chunk of images; a set named in ``units`` is judged on
    those output units only (task-incremental)."""
    n = model.params[-1].shape[-1]
    device = model.params[0].device
    counts = {
        name: (
            stacked_correct(
                model, x, y, dtype, head_bias((units or {}).get(name), n, device)
            ).tolist(),
            int(y.shape[0]),
        )
        for name, (x, y) in sets.items()
    }
    return [
        accuracies({name: (c[run], n) for name, (c, n) in counts.items()}, unions)
        for run in range(model.k)
    ]
