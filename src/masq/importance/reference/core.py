"""The naive twins of the diagonal measures and the Fisher block (module docstring of
:mod:`masq.importance.reference`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from masq.config import FisherLabels, Scale, choice
from masq.errors import ConfigError
from masq.importance.blocks import BlockStats
from masq.importance.diagonal import cross_entropy
from masq.importance.persample import Importance, LossFn, trainable_params

__all__ = [
    "fisher",
    "fisher_block",
    "fisher_block_stats",
    "float64_copy",
    "labelled_samples",
    "mas",
    "masq",
    "per_sample_gradients",
    "positions",
    "restricted",
    "sample_gradient",
    "unit_list",
    "wide",
]


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode."""
    return copy.deepcopy(model).double().eval()


def wide(x: Tensor) -> Tensor:
    """Floating inputs in float64; integer inputs (indices) as they are."""
    return x.double() if x.is_floating_point() else x


def unit_list(outputs: Sequence[int] | Tensor | None) -> list[int] | None:
    """The active output units as a list of ints (None: all of them)."""
    return None if outputs is None else [int(u) for u in outputs]


def restricted(loss: LossFn, units: list[int] | None) -> LossFn:
    """l(z, t) = loss(z[:, units], t): the loss on the task's active units only."""
    if units is None:
        return loss
    return lambda logits, targets: loss(logits[:, units], targets)


def positions(y: Tensor, units: list[int] | None) -> Tensor:
    """Each label y_n (a unit of the full head) replaced by its position among ``units``."""
    if units is None:
        return y
    stray = sorted({int(v) for v in y if int(v) not in units})
    if stray:
        raise ConfigError(f"y: labels {stray} are not among the task's output units {units}")
    return torch.tensor([units.index(int(v)) for v in y], dtype=torch.long, device=y.device)


def sample_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn) -> dict[str, Tensor]:
    """g = d loss(model(x), y) / d theta for ONE sample ``x`` (no batch dim), label ``y`` (0-dim).

    One forward and one backward pass on ``model`` as it is (no copy, no dtype change); zeros
    for trainable parameters the loss does not reach.
    """
    params = trainable_params(model)
    value = loss(model(x.unsqueeze(0)), y.reshape(1)).sum()
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(params.items(), grads, strict=True)
    }


def per_sample_gradients(
    model: nn.Module, x: Tensor, y: Tensor, loss: LossFn = cross_entropy
) -> dict[str, Tensor]:
    """{name: [N, *shape]}: row n is g_n = d loss(model(x_n), y_n) / d theta, in float64."""
    work = float64_copy(model)
    x = wide(x)
    rows = [sample_gradient(work, x[n], y[n], loss) for n in range(len(x))]
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


def labelled_samples(
    work: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    mode: FisherLabels,
    generator: torch.Generator | None,
    units: list[int] | None,
) -> Iterator[tuple[Tensor, list[tuple[Tensor, Tensor | None]]]]:
    """(x_n in float64, its label terms [(target, weight or None)]) for every sample, in pass
    order, from the float64 ``work`` model: the data's label (positions among ``units``), the
    argmax, one draw per sample (one ``torch.multinomial`` per batch, as in the fast code) with
    weight None, or every class c with weight p_c ("exact"); p = softmax(model(x)[units])."""
    if mode is FisherLabels.SAMPLE and generator is None:
        raise ConfigError("labels='sample' needs generator=torch.Generator().manual_seed(SEED)")
    for x, y in batches:
        x = wide(x)
        with torch.no_grad():
            logits = work(x)
            probs = torch.softmax(logits if units is None else logits[:, units], dim=1)
        if mode is FisherLabels.EMPIRICAL:
            y = positions(y, units)
        elif mode is FisherLabels.PREDICTED:
            y = probs.argmax(1)
        elif mode is FisherLabels.SAMPLE:
            assert generator is not None
            drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator)
            y = drawn.squeeze(1).to(probs.device)
        for n in range(len(x)):
            if mode is FisherLabels.EXACT:
                classes = range(probs.shape[1])
                yield x[n], [(torch.tensor(c, device=probs.device), probs[n, c]) for c in classes]
            else:
                yield x[n], [(y[n], None)]


def fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: FisherLabels | str = FisherLabels.EMPIRICAL,
    generator: torch.Generator | None = None,
    loss: LossFn = cross_entropy,
    outputs: Sequence[int] | Tensor | None = None,
) -> Importance:
    """F_k = (1/N) sum_n g_nk^2 with y_n the data's label (``"empirical"``), one label drawn
    from softmax(model(x_n)) (``"sample"``) or its argmax (``"predicted"``); for ``"exact"``
    (1/N) sum_n sum_c p_c(x_n) g_nk(c)^2; for ``"batched"`` :func:`masq` with scale "mean".

    ``labels="sample"`` replaces y by the draws of one ``torch.multinomial(softmax(logits), 1,
    generator=generator)`` per batch (the fast code draws the same labels from the same
    probabilities, so a float64 model with the same seed gives the same labels).

    ``outputs`` U: the logits are model(x_n)[U], the labels y_n their positions in U, and the
    classes c of sample/exact/predicted range over U (p = softmax(model(x_n)[U])).
    """
    mode = choice(FisherLabels, labels, "labels")
    if mode is FisherLabels.BATCHED:
        return masq(model, batches, scale=Scale.MEAN, loss=loss, outputs=outputs)
    work = float64_copy(model)
    units = unit_list(outputs)
    loss = restricted(loss, units)
    sums = {n: torch.zeros_like(p) for n, p in trainable_params(work).items()}
    count = 0
    for xn, terms in labelled_samples(work, batches, mode, generator, units):
        for label, weight in terms:
            g = sample_gradient(work, xn, label, loss)
            for k in sums:
                sums[k] += g[k] ** 2 if weight is None else weight * g[k] ** 2
        count += 1
    return {k: s / count for k, s in sums.items()}


def masq(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    scale: Scale | str = Scale.MEAN,
    loss: LossFn = cross_entropy,
    outputs: Sequence[int] | Tensor | None = None,
) -> Importance:
    """F_k = (1/K) sum_b gbar_bk^2 with gbar_b = (1/|b|) sum_{n in b} g_n; x |b| per batch for
    ``scale="sum"``.

    The batch gradient gbar_b is built from per-sample gradients, not from a batch backward.
    ``outputs`` U: l_n = loss(model(x_n)[U], position of y_n in U).
    """
    mode = choice(Scale, scale, "scale")
    work = float64_copy(model)
    units = unit_list(outputs)
    loss = restricted(loss, units)
    sums = {n: torch.zeros_like(p) for n, p in trainable_params(work).items()}
    count = 0
    for x, y in batches:
        x, y = wide(x), positions(y, units)
        rows = [sample_gradient(work, x[n], y[n], loss) for n in range(len(x))]
        for k in sums:
            mean = sum(r[k] for r in rows) / len(x)
            sums[k] += mean**2 * (len(x) if mode is Scale.SUM else 1)
        count += 1
    return {k: s / count for k, s in sums.items()}


def mas(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    outputs: Sequence[int] | Tensor | None = None,
) -> Importance:
    """Omega_k = (1/N) sum_n |d ||f(x_n)||_2^2 / d theta_k|, f(x_n) = model(x_n) (or
    model(x_n)[U] for ``outputs`` U): one backward of sample n's squared output norm per sample,
    its absolute gradient summed. The labels are not read."""
    work = float64_copy(model)
    norm = restricted(lambda logits, _: logits.flatten(1).square().sum(1), unit_list(outputs))
    sums = {n: torch.zeros_like(p) for n, p in trainable_params(work).items()}
    count = 0
    for x, y in batches:
        x = wide(x)
        for n in range(len(x)):
            g = sample_gradient(work, x[n], y[n], norm)
            for k in sums:
                sums[k] += g[k].abs()
        count += len(x)
    return {k: s / count for k, s in sums.items()}


def fisher_block(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    name: str,
    *,
    loss: LossFn = cross_entropy,
) -> Tensor:
    """F = G^T G / N (P x P), G the explicit N x P matrix of the per-sample gradients of the
    tensor ``name`` (rows g_n, flattened in row-major order)."""
    names = trainable_params(model)
    if name not in names:
        raise ConfigError(f"unknown parameter {name!r}; valid names: {', '.join(names)}")
    parts = [per_sample_gradients(model, x, y, loss)[name].flatten(1) for x, y in batches]
    g = torch.cat(parts)
    return g.T @ g / len(g)


def fisher_block_stats(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    name: str,
    *,
    loss: LossFn = cross_entropy,
) -> BlockStats:
    """Exact statistics of F = G^T G / N (:func:`fisher_block`).

    Diagonal: the P entries F_ii; off-diagonal: the P^2 - P entries F_ij, i != j; their sums,
    means and (off-diagonal) sums and means of |F_ij|. Means over zero entries are NaN.
    """
    batches = list(batches)
    f = fisher_block(model, batches, name, loss=loss)
    size = f.shape[0]
    off = f[~torch.eye(size, dtype=torch.bool, device=f.device)]
    return BlockStats(
        name=name,
        num_params=size,
        num_samples=sum(len(x) for x, _ in batches),
        diag_count=size,
        offdiag_count=size * size - size,
        diag_sum=float(f.diagonal().sum()),
        diag_mean=float(f.diagonal().mean()),
        offdiag_sum=float(off.sum()),
        offdiag_mean=float(off.mean()),
        offdiag_abs_sum=float(off.abs().sum()),
        offdiag_abs_mean=float(off.abs().mean()),
        estimated=False,
    )
