"""The diagonal measures: the diagonal empirical Fisher (FIM) and MaSQ (PAPER.md section 4).

N samples in K batches b, per-sample losses l_n and gradients g_n = d l_n / d theta:

- :func:`fisher`: F_k = (1/N) sum_n g_nk^2 (per-sample squares, then the mean)
- :func:`masq`: F_k = (1/K) sum_b ((1/|b|) sum_{n in b} g_nk)^2 (batch means, then squares)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from masq.config import FisherLabels, Scale, choice
from masq.errors import ConfigError
from masq.importance.persample import (
    Importance,
    LossFn,
    _check_batch,
    _check_values,
    _deltas,
    _evaluating,
    _finish,
    _generic_grads,
    _input_width,
    _label_terms,
    _linear_sites,
    _LinearSite,
    _LinearTap,
    _paused,
    _per_sample_losses,
    _tapped,
    _trainable,
    _weighted_square_sum,
)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy l_n = -log softmax(logits_n)[y_n] (reduction "none")."""
    return nn.functional.cross_entropy(logits, y, reduction="none")


def batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``(x, y)`` in order: batch b holds samples [b B, (b + 1) B), B = batch_size.

    The last batch holds the N - (K - 1) B remaining samples, K = ceil(N / B).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} samples but y has {len(y)}; pass matching tensors")

    def generate() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]

    return generate()


def summary(imp: Importance) -> dict[str, dict[str, float]]:
    """Per tensor F: {"max": max_k F_k, "mean": (1/P) sum_k F_k, "sum": sum_k F_k} (float64)."""
    return {
        name: {
            "max": float(t.max()),
            "mean": float(t.double().mean()),
            "sum": float(t.double().sum()),
        }
        for name, t in imp.items()
    }


# --------------------------------------------------------------------------------- fisher


def _fisher_batch(
    model: nn.Module,
    sites: dict[str, _LinearSite],
    taps: dict[str, _LinearTap],
    batch: tuple[Tensor, Tensor],
    labels: FisherLabels,
    generator: torch.Generator | None,
    loss: LossFn,
    sums: dict[str, Tensor],
    index: int = 0,
) -> None:
    """Add sum_{n in batch} (weighted) g_n^2 of every trainable parameter to ``sums``
    (batch number ``index``: its values are checked first, :func:`_check_values`)."""
    x, y = batch
    for tap in taps.values():
        tap.reset()
    logits = model(x)
    _check_values(x, y, logits, index, labels is FisherLabels.TRUE and loss is cross_entropy)
    terms = _label_terms(logits, y, labels, generator)
    clean = {m: tap for m, tap in taps.items() if tap.clean(len(x))}
    d2: dict[str, Tensor] = {}  # sum over label terms of w_n delta_n^2, per clean layer
    for i, (targets, weight) in enumerate(terms):
        losses = _per_sample_losses(loss, logits, targets)
        if not clean:
            continue
        deltas = _deltas(losses, clean, sites, retain=i + 1 < len(terms))
        for m in clean:
            delta = deltas.pop(m)  # drop every reference to a delta once it is squared
            clean[m].delta = None
            if delta is None:
                continue
            sq = delta.square() if weight is None else delta.square() * weight[:, None]
            d2[m] = d2[m] + sq if m in d2 else sq
    for m, sq in d2.items():
        site = sites[m]
        if site.weight is not None:
            a = clean[m].input
            assert a is not None
            sums[site.weight].add_(sq.T @ a.square())  # float32 product added in float64
        if site.bias is not None:
            sums[site.bias].add_(sq.sum(0))
    covered = {n for m in clean for n in sites[m].names}
    rest = [n for n in sums if n not in covered]
    if rest:
        with _paused(taps):
            _generic_square_sums(model, rest, x, terms, loss, sums)


def _generic_square_sums(
    model: nn.Module,
    names: list[str],
    x: Tensor,
    terms: list[tuple[Tensor, Tensor | None]],
    loss: LossFn,
    sums: dict[str, Tensor],
) -> None:
    """Add sum_n (weighted) g_n^2 of the parameters ``names`` from torch.func gradients."""
    for targets, weight in terms:
        for part, g in _generic_grads(model, names, x, targets, loss):
            w = None if weight is None else weight[part]
            for n, gn in g.items():
                sums[n] += _weighted_square_sum(gn, w)


def fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: FisherLabels | str = FisherLabels.TRUE,
    generator: torch.Generator | None = None,
    loss: LossFn = cross_entropy,
    device: torch.device | str | None = None,
) -> Importance:
    """The diagonal Fisher F_k = (1/N) sum_n g_nk^2 from exact per-sample gradients.

    g_n is the gradient of sample n's own loss l_n (no 1/B factor), so the result does not depend
    on how the N samples are split into batches (for ``labels="sampled"`` the draws do).

    ``labels`` (a :class:`~masq.config.FisherLabels` or its value):
      - ``"true"``: l_n = loss(model(x_n), y_n), the empirical Fisher (the paper's FIM).
      - ``"sampled"``: y_n is replaced by one label drawn from softmax(model(x_n)); per batch one
        ``torch.multinomial(softmax(logits), 1, generator=generator)`` over the whole batch, in
        batch order. ``generator`` (a seeded torch.Generator on the device where the draw should
        happen) is required; the global RNG is never used.
      - ``"exact"``: F_k = (1/N) sum_n sum_c p_c(x_n) g_nk(c)^2, g_n(c) the gradient for label c
        and p(x_n) = softmax(model(x_n)), taken as constant weights. Costs C backward passes.

    Cost: parameters of nn.Linear layers (called once per forward on a [B, in] input, parameters
    not shared) use the closed form sum_n g_n(W)^2 = (delta*delta)^T (a*a), sum_n g_n(b)^2 =
    sum_n delta_n^2 from one forward and one backward; memory O(params + batch x width). A layer
    weight must not be used outside its module's forward. Every other trainable parameter (conv,
    norm, ...) gets per-sample gradients from torch.func (vmap of grad) in bounded chunks; the
    model and ``loss`` must then be vmap-compatible (no .item(), no one_hot, no data-dependent
    control flow).
    Samples must be independent in eval mode (no cross-sample operations in the model).

    Inputs are checked once per batch (two reductions, one host sync): NaN/inf in ``x``, a label
    outside 0..C-1 (default loss, ``labels="true"``), ``x`` not [B, in_features] (a model that
    is an ``nn.Sequential`` starting with ``nn.Linear``) are one-line ConfigErrors.
    """
    mode = choice(FisherLabels, labels, "labels")
    if mode is FisherLabels.SAMPLED and generator is None:
        raise ConfigError(
            "labels='sampled' needs generator=torch.Generator().manual_seed(SEED) for the draws"
        )
    with _evaluating(model, device) as (work, dev):
        params = _trainable(work)
        sites = _linear_sites(work, params)
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
        count = 0
        width, labelled = _input_width(work), mode is FisherLabels.TRUE and loss is cross_entropy
        with _tapped(sites) as taps:
            for index, (x, y) in enumerate(batches):
                _check_batch(x, y, index, width, labelled)
                batch = (x.to(dev), y.to(dev))
                _fisher_batch(work, sites, taps, batch, mode, generator, loss, sums, index)
                count += len(x)
    return _finish(sums, count, model)


# ----------------------------------------------------------------------------------- masq


def masq(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    scale: Scale | str = Scale.MEAN,
    loss: LossFn = cross_entropy,
    device: torch.device | str | None = None,
) -> Importance:
    """MaSQ, the squared batch-mean gradient averaged over the K batches of the pass.

    ``scale="mean"`` (the paper): F_k = (1/K) sum_b gbar_bk^2 with gbar_b = (1/|b|) sum_{n in b}
    g_n, the gradient of the batch-MEAN loss. B_MaSQ is the batch size of ``batches``: with
    batches of one sample MaSQ equals :func:`fisher`; MaSQ <= fisher entry by entry (Jensen).

    ``scale="sum"`` (the convention of the authors' group code): per batch the squared gradient
    of the SUMMED batch loss divided by the batch size, averaged over batches:
    F_k = (1/K) sum_b (sum_{n in b} g_nk)^2 / |b| = (1/K) sum_b |b| gbar_bk^2. With equal batches
    of size B that is exactly B x the "mean" value. A shorter last batch is divided by its own
    size |b|; code that divides every batch by the nominal B instead weights that batch's term by
    |b|/B less.

    One forward and one ordinary backward per batch; ``.grad`` is not touched. The inputs are
    checked per batch as in :func:`fisher`.
    """
    mode = choice(Scale, scale, "scale")
    with _evaluating(model, device) as (work, dev):
        params = _trainable(work)
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
        count = 0
        width, labelled = _input_width(work), loss is cross_entropy
        for index, (x, y) in enumerate(batches):
            _check_batch(x, y, index, width, labelled)
            x, y = x.to(dev), y.to(dev)
            logits = work(x)
            _check_values(x, y, logits, index, labelled)
            losses = _per_sample_losses(loss, logits, y)
            grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
            factor = len(x) if mode is Scale.SUM else 1
            for n, g in zip(params, grads, strict=True):
                if g is not None:
                    sums[n].add_(g.square(), alpha=factor)
            count += 1
    return _finish(sums, count, model)
