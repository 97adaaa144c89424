"""The diagonal measures: the diagonal empirical Fisher (FIM) and MaSQ (the paper's).

N samples in K batches b, per-sample losses l_n and gradients g_n = d l_n / d theta:

- :func:`fisher`: F_k = (1/N) sum_n g_nk^2 (per-sample squares, then the mean)
- :func:`masq`: F_k = (1/K) sum_b ((1/|b|) sum_{n in b} g_nk)^2 (batch means, then squares)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from masq.config import FisherLabels, Scale, choice
from masq.errors import ConfigError
from masq.importance.gradients import (
    LinearSite,
    LinearTap,
    generic_grads,
    linear_deltas,
    linear_sites,
    paused,
    tapped,
)
from masq.importance.persample import (
    DEFAULT_BUFFER_BYTES,
    ActiveOutputs,
    Importance,
    LossFn,
    active_outputs,
    check_batch,
    check_buffer_bytes,
    check_values,
    evaluating,
    finish_importance,
    input_width,
    per_sample_losses,
    trainable_params,
)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy l_n = -log softmax(logits_n)[y_n] (reduction "none")."""
    return nn.functional.cross_entropy(logits, y, reduction="none")


class Batches:
    """The batches of ``(x, y)`` in order: batch b holds samples [b B, (b + 1) B), B =
    ``batch_size``; the last one holds the N - (K - 1) B remaining samples, K = ceil(N / B).

    Re-iterable: every ``for`` over it starts again at the first batch (views of ``x`` and
    ``y``, no copies), so one object serves several measures, e.g. the FIM and then MaSQ of
    the same data. ``len()`` is K.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if len(x) != len(y):
            raise ConfigError(f"x has {len(x)} samples but y has {len(y)}; pass matching tensors")
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.batch_size
        for start in range(0, len(self.x), b):
            yield self.x[start : start + b], self.y[start : start + b]

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __repr__(self) -> str:
        return f"Batches({len(self.x)} samples, batch_size={self.batch_size}, {len(self)} batches)"


def batches(x: Tensor, y: Tensor, batch_size: int) -> Batches:
    """The batches of ``(x, y)`` of size ``batch_size`` in order (:class:`Batches`): a
    re-iterable object, so that the README's FIM-then-MaSQ on one ``data`` sees the same
    batches twice (a one-shot generator would hand the second measure nothing)."""
    return Batches(x, y, batch_size)


def check_batches(batches: object) -> None:
    """A one-line ConfigError when ``batches`` is a tensor, a dict or a pair (x, y), not an
    iterable of (x, y) batches (iterating it would unpack the rows of x: a raw ValueError)."""
    pair = isinstance(batches, tuple | list) and any(isinstance(b, Tensor) for b in batches)
    if isinstance(batches, Tensor | dict) or pair:
        what = f"a {type(batches).__name__}{' of tensors' if pair else ''}"
        raise ConfigError(
            f"batches: got {what}; pass an iterable of (x, y) batches, e.g. "
            "importance.batches(x, y, batch_size)"
        )


def subset(
    x: Tensor, y: Tensor, n: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """n samples of (x, y) drawn without replacement, in their original order: the first n of
    ``torch.randperm(N, generator=generator)``, sorted. n = 0 or n >= N: all of them, unchanged
    (no draw is made, so the generator's later draws are as without a subset)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"fisher_samples: give a number of samples >= 0, got {n!r}")
    if n == 0 or n >= len(x):
        return x, y
    if generator is None:
        raise ConfigError("a subset of samples needs generator=torch.Generator().manual_seed(SEED)")
    order = torch.randperm(len(x), generator=generator, device=generator.device)
    index = order[:n].sort().values.to(x.device)
    return x[index], y[index.to(y.device)]


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


# ---------------------------------------------------------------------------- label terms


def label_terms(
    logits: Tensor, y: Tensor, labels: FisherLabels, generator: torch.Generator | None
) -> list[tuple[Tensor, Tensor | None]]:
    """The (targets, per-sample weight w_n or None for 1) pairs whose sum_n w_n g_n^2 are summed.

    empirical: [(y, 1)]; sample: [(y~ drawn from softmax(logits), 1)]; predicted:
    [(argmax_c logits_c, 1)]; exact: [(c, p_c) for every class c], p = softmax(logits) taken as
    constant.
    """
    if labels is FisherLabels.EMPIRICAL:
        return [(y, None)]
    if logits.ndim != 2:
        raise ConfigError(
            f"labels={labels.value!r} needs logits of shape [B, classes], got "
            f"{tuple(logits.shape)}; use labels='empirical'"
        )
    if labels is FisherLabels.PREDICTED:
        return [(logits.detach().argmax(1), None)]
    probs = torch.softmax(logits.detach(), dim=1)
    if labels is FisherLabels.SAMPLE:
        assert generator is not None
        drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator)
        return [(drawn.squeeze(1).to(logits.device), None)]
    return [
        (torch.full((len(logits),), c, dtype=torch.long, device=logits.device), probs[:, c])
        for c in range(logits.shape[1])
    ]


def _weighted_square_sum(g: Tensor, weight: Tensor | None) -> Tensor:
    """sum_n w_n g_n^2 over the leading (sample) dimension, in float64."""
    sq = g.square()
    if weight is None:
        return sq.sum(0).double()
    return (weight.to(sq.dtype) @ sq.flatten(1)).view(sq.shape[1:]).double()


# --------------------------------------------------------------------------------- fisher


@dataclass(frozen=True)
class _FisherPass:
    """What stays fixed over the batches of one :func:`fisher` pass."""

    model: nn.Module
    sites: dict[str, LinearSite]
    taps: dict[str, LinearTap]
    labels: FisherLabels
    generator: torch.Generator | None
    loss: LossFn
    active: ActiveOutputs | None  # the task's output units (None: all)
    buffer_bytes: int

    @property
    def checks_labels(self) -> bool:
        """Whether the labels are those of the default cross-entropy (checked in range)."""
        return self.labels is FisherLabels.EMPIRICAL and self.loss is cross_entropy

    @property
    def label_units(self) -> ActiveOutputs | None:
        """The units the labels y are mapped from (only where y is used: empirical labels)."""
        return self.active if self.labels is FisherLabels.EMPIRICAL else None


def _fisher_batch(
    run: _FisherPass, batch: tuple[Tensor, Tensor], sums: dict[str, Tensor], index: int = 0
) -> None:
    """Add sum_{n in batch} (weighted) g_n^2 of every trainable parameter to ``sums``
    (batch number ``index``: its values are checked first, :func:`check_values`)."""
    x, y = batch
    sites, taps, loss = run.sites, run.taps, run.loss
    for tap in taps.values():
        tap.reset()
    logits = run.model(x)
    if run.active is not None:
        logits = run.active.select(logits)
    check_values(x, y, logits, index, run.checks_labels, run.label_units)
    if run.label_units is not None:
        y = run.label_units.positions(y)
    terms = label_terms(logits, y, run.labels, run.generator)
    clean = {m: tap for m, tap in taps.items() if tap.clean(len(x))}
    d2: dict[str, Tensor] = {}  # sum over label terms of w_n delta_n^2, per clean layer
    for i, (targets, weight) in enumerate(terms):
        losses = per_sample_losses(loss, logits, targets)
        if not clean:
            continue
        deltas = linear_deltas(losses, clean, sites, retain=i + 1 < len(terms))
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
        full_loss = loss if run.active is None else run.active.restrict(loss)
        with paused(taps):
            _generic_square_sums(run.model, rest, x, terms, full_loss, sums, run.buffer_bytes)


def _generic_square_sums(
    model: nn.Module,
    names: list[str],
    x: Tensor,
    terms: list[tuple[Tensor, Tensor | None]],
    loss: LossFn,
    sums: dict[str, Tensor],
    buffer_bytes: int,
) -> None:
    """Add sum_n (weighted) g_n^2 of the parameters ``names`` from torch.func gradients."""
    for targets, weight in terms:
        for part, g in generic_grads(model, names, x, targets, loss, buffer_bytes=buffer_bytes):
            w = None if weight is None else weight[part]
            for n, gn in g.items():
                sums[n] += _weighted_square_sum(gn, w)


def fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: FisherLabels | str = FisherLabels.EMPIRICAL,
    generator: torch.Generator | None = None,
    loss: LossFn = cross_entropy,
    device: torch.device | str | None = None,
    outputs: Sequence[int] | Tensor | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> Importance:
    """The diagonal Fisher F_k = (1/N) sum_n g_nk^2 from exact per-sample gradients.

    g_n is the gradient of sample n's own loss l_n (no 1/B factor), so the result does not depend
    on how the N samples are split into batches (for ``labels="sample"`` the draws do; for
    ``"batched"`` the split is the formula).

    ``labels`` (a :class:`~masq.config.FisherLabels` or its value; the names of van de Ven 2025,
    "On the computation of the Fisher information in continual learning", arXiv:2502.11756):
      - ``"empirical"`` (masq 0.1: ``"true"``): l_n = loss(model(x_n), y_n) with the data's
        label, the empirical Fisher (the paper's FIM).
      - ``"sample"`` (masq 0.1: ``"sampled"``): y_n is replaced by one label drawn from
        softmax(model(x_n)); per batch one ``torch.multinomial(softmax(logits), 1,
        generator=generator)`` over the whole batch, in batch order. ``generator`` (a seeded
        torch.Generator on the device where the draw should happen) is required; the global
        RNG is never used. An unbiased one-draw estimate of ``"exact"``.
      - ``"exact"``: F_k = (1/N) sum_n sum_c p_c(x_n) g_nk(c)^2, g_n(c) the gradient for label c
        and p(x_n) = softmax(model(x_n)), taken as constant weights: the true Fisher of the
        model's predictive distribution. Costs C backward passes.
      - ``"predicted"``: y_n = argmax_c p_c(x_n), the model's most probable label (what several
        published codebases compute and call the Fisher); biased towards confident classes.
      - ``"batched"``: F_k = (1/K) sum_b gbar_bk^2, gbar_b the gradient of the batch-MEAN loss
        with the data's labels over the K batches of ``batches`` (size b): exactly
        :func:`masq` with ``scale="mean"`` at B_MaSQ = b (the squared mini-batch gradient of
        published code that says "Fisher"). One backward per batch; ``generator`` and
        ``buffer_bytes`` are not used. With b = 1 it is ``"empirical"``.

    ``outputs`` (task-incremental heads): the task's active output units U; the logits are then
    model(x_n)[U] (the other units masked), a label y_n (a unit of the full head, which must be
    in U) is replaced by its position in U, and sample/exact/predicted labels range over U only,
    with p = softmax(model(x_n)[U]). The entries of the head rows outside U come out exactly 0.
    None (the default): every unit.

    Cost: parameters of nn.Linear layers (called once per forward on a [B, in] input, parameters
    not shared) use the closed form sum_n g_n(W)^2 = (delta*delta)^T (a*a), sum_n g_n(b)^2 =
    sum_n delta_n^2 from one forward and one backward; memory O(params + batch x width). A layer
    weight must not be used outside its module's forward. Every other trainable parameter (conv,
    norm, ...) gets per-sample gradients from torch.func (vmap of grad) in chunks of at most
    ``buffer_bytes`` of gradients; the model and ``loss`` must then be vmap-compatible (no
    .item(), no one_hot, no data-dependent control flow).
    Samples must be independent in eval mode (no cross-sample operations in the model).

    Inputs are checked once per batch (two reductions, one host sync): NaN/inf in ``x``, a label
    outside 0..C-1 (default loss, empirical labels) or outside ``outputs``, ``x`` not
    [B, in_features] (a model that is an ``nn.Sequential`` starting with ``nn.Linear``) are
    one-line ConfigErrors.
    """
    check_batches(batches)
    mode = choice(FisherLabels, labels, "labels")
    if mode is FisherLabels.BATCHED:
        return masq(model, batches, scale=Scale.MEAN, loss=loss, device=device, outputs=outputs)
    if mode is FisherLabels.SAMPLE and generator is None:
        raise ConfigError(
            "labels='sample' needs generator=torch.Generator().manual_seed(SEED) for the draws"
        )
    check_buffer_bytes(buffer_bytes)
    with evaluating(model, device) as (work, dev):
        params = trainable_params(work)
        sites = linear_sites(work, params)
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
        count = 0
        width, active = input_width(work), active_outputs(outputs, dev)
        with tapped(sites) as taps:
            run = _FisherPass(work, sites, taps, mode, generator, loss, active, buffer_bytes)
            for index, (x, y) in enumerate(batches):
                check_batch(x, y, index, width, run.checks_labels, run.label_units)
                _fisher_batch(run, (x.to(dev), y.to(dev)), sums, index)
                count += len(x)
    return finish_importance(sums, count, model)


# ----------------------------------------------------------------------------------- masq


def masq(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    scale: Scale | str = Scale.MEAN,
    loss: LossFn = cross_entropy,
    device: torch.device | str | None = None,
    outputs: Sequence[int] | Tensor | None = None,
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

    ``outputs`` (task-incremental heads): l_n = loss(model(x_n)[U], j_n) with U the task's active
    output units and j_n the position of the label y_n (a unit of the full head) in U, as in
    :func:`fisher`. None: every unit.

    One forward and one ordinary backward per batch; ``.grad`` is not touched. The inputs are
    checked per batch as in :func:`fisher`.
    """
    check_batches(batches)
    mode = choice(Scale, scale, "scale")
    with evaluating(model, device) as (work, dev):
        params = trainable_params(work)
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
        count = 0
        width, labelled = input_width(work), loss is cross_entropy
        active = active_outputs(outputs, dev)
        for index, (x, y) in enumerate(batches):
            check_batch(x, y, index, width, labelled, active)
            x, y = x.to(dev), y.to(dev)
            logits = work(x)
            if active is not None:
                logits = active.select(logits)
            check_values(x, y, logits, index, labelled, active)
            if active is not None:
                y = active.positions(y)
            losses = per_sample_losses(loss, logits, y)
            grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
            factor = len(x) if mode is Scale.SUM else 1
            for n, g in zip(params, grads, strict=True):
                if g is not None:
                    sums[n].add_(g.square(), alpha=factor)
            count += 1
    return finish_importance(sums, count, model)
