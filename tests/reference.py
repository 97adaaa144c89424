"""Naive reference implementations for tests: one backward pass per sample, no tricks.

Meant for tiny float64 models. Every function evaluates the model in eval mode (as the fast
code does), restores the train/eval flags afterwards and never touches ``.grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

Loss = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy (reduction "none")."""
    return nn.functional.cross_entropy(logits, y, reduction="none")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode; every module's training flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sample_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Loss) -> dict[str, Tensor]:
    """Gradient of the loss of ONE sample ``x`` (no batch dim) with label ``y`` (0-dim)."""
    params = trainable(model)
    value = loss(model(x.unsqueeze(0)), y.reshape(1)).sum()
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(params.items(), grads, strict=True)
    }


def per_sample_gradients(
    model: nn.Module, x: Tensor, y: Tensor, loss: Loss = cross_entropy
) -> dict[str, Tensor]:
    """{name: [N, *shape]}: one backward pass per sample."""
    with evaluating(model):
        rows = [sample_gradient(model, x[n], y[n], loss) for n in range(len(x))]
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


def fisher_reference(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    labels: str = "true",
    generator: torch.Generator | None = None,
    loss: Loss = cross_entropy,
) -> dict[str, Tensor]:
    """F_k = (1/N) sum_n g_nk^2 (true / sampled labels) or (1/N) sum_n sum_c p_c g_nk(c)^2.

    Sampled labels: per batch one torch.multinomial over the softmax of the whole batch.
    """
    with evaluating(model):
        sums = {n: torch.zeros_like(p) for n, p in trainable(model).items()}
        count = 0
        for x, y in batches:
            with torch.no_grad():
                probs = torch.softmax(model(x), dim=1)
            if labels == "sampled":
                y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            for n in range(len(x)):
                if labels == "exact":
                    terms = [(torch.tensor(c), probs[n, c]) for c in range(probs.shape[1])]
                else:
                    terms = [(y[n], torch.tensor(1.0, dtype=probs.dtype))]
                for label, weight in terms:
                    g = sample_gradient(model, x[n], label, loss)
                    for k in sums:
                        sums[k] += weight * g[k] ** 2
            count += len(x)
    return {k: s / count for k, s in sums.items()}


def masq_reference(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    scale: str = "mean",
    loss: Loss = cross_entropy,
) -> dict[str, Tensor]:
    """(1/K) sum_b ((1/|b|) sum_{n in b} g_n)^2, times |b| per batch for scale="sum".

    The batch gradient is built from per-sample gradients, not from a batch backward.
    """
    with evaluating(model):
        sums = {n: torch.zeros_like(p) for n, p in trainable(model).items()}
        count = 0
        for x, y in batches:
            rows = [sample_gradient(model, x[n], y[n], loss) for n in range(len(x))]
            for k in sums:
                mean = sum(r[k] for r in rows) / len(x)
                sums[k] += mean**2 * (len(x) if scale == "sum" else 1)
            count += 1
    return {k: s / count for k, s in sums.items()}


def block_stats_reference(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    name: str,
    loss: Loss = cross_entropy,
) -> dict[str, float]:
    """Statistics of F = G^T G / N with G the explicit N x P per-sample gradient matrix."""
    parts = [per_sample_gradients(model, x, y, loss)[name].flatten(1) for x, y in batches]
    g = torch.cat(parts).double()
    f = g.T @ g / len(g)
    size = f.shape[0]
    off = ~torch.eye(size, dtype=torch.bool)
    return {
        "diag_sum": float(f.diagonal().sum()),
        "diag_mean": float(f.diagonal().mean()),
        "offdiag_sum": float(f[off].sum()),
        "offdiag_mean": float(f[off].mean()),
        "offdiag_abs_sum": float(f[off].abs().sum()),
        "offdiag_abs_mean": float(f[off].abs().mean()),
    }
