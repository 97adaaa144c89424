"""MAS, Memory Aware Synapses (Aljundi et al. 2018): how sensitive the output is to each parameter.

N samples x_n, the network's output f(x_n) (the logits, or the task's active units of them,
``outputs``) and its squared L2 norm l_n = ||f(x_n)||_2^2 = sum_c f_c(x_n)^2:

    Omega_k = (1/N) sum_n |g_nk|,   g_n = d l_n / d theta,

the mean ABSOLUTE per-sample gradient (not the absolute batch gradient; no label enters it).
Unlike the Fisher it needs no labels: Aljundi et al. compute it on any (also unlabelled) data.

``mas`` is registered as the measure "mas" (label "MAS", a method of its own in tables rather
than "EWC+MAS"): after a phase, on the task's training data in batches of ``masq_batch``
samples, which bound memory and do not enter the formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from masq.importance import diagonal
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
from masq.importance.registry import Measure, MeasureContext, register_measure
from masq.tasks import XY

__all__ = ["MAS", "mas", "mas_measure", "squared_norm"]


def squared_norm(logits: Tensor, y: Tensor) -> Tensor:
    """MAS's per-sample "loss" l_n = ||f(x_n)||_2^2 = sum_c f_c(x_n)^2 (``y`` is not read)."""
    return logits.flatten(1).square().sum(1)


def _mas_batch(
    model: nn.Module,
    sites: dict[str, LinearSite],
    taps: dict[str, LinearTap],
    batch: tuple[Tensor, Tensor],
    active: ActiveOutputs | None,
    sums: dict[str, Tensor],
    index: int,
    buffer_bytes: int,
) -> None:
    """Add sum_{n in batch} |g_n| of every trainable parameter to ``sums`` (float64)."""
    x, y = batch
    for tap in taps.values():
        tap.reset()
    out = model(x)
    if active is not None:
        out = active.select(out)
    check_values(x, y, out, index, labels=False)
    losses = per_sample_losses(squared_norm, out, y)
    clean = {m: tap for m, tap in taps.items() if tap.clean(len(x))}
    if clean:
        deltas = linear_deltas(losses, clean, sites, retain=False)
        for m, tap in clean.items():
            delta, tap.delta = deltas.pop(m), None
            if delta is None:
                continue
            site, size = sites[m], delta.abs()
            if site.weight is not None:
                assert tap.input is not None
                sums[site.weight].add_(size.T @ tap.input.abs())  # |Delta|^T |A|, added in f64
            if site.bias is not None:
                sums[site.bias].add_(size.sum(0))
    covered = {n for m in clean for n in sites[m].names}
    rest = [n for n in sums if n not in covered]
    if rest:
        norm: LossFn = squared_norm if active is None else active.restrict(squared_norm)
        with paused(taps):
            for _, g in generic_grads(model, rest, x, y, norm, buffer_bytes=buffer_bytes):
                for n, gn in g.items():
                    sums[n] += gn.abs().sum(0).double()


def mas(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str | None = None,
    outputs: Sequence[int] | Tensor | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> Importance:
    """MAS importance Omega_k = (1/N) sum_n |d ||f(x_n)||_2^2 / d theta_k| (Aljundi et al. 2018).

    f(x_n) = model(x_n) (flattened per sample), or model(x_n)[U] with ``outputs`` U, the task's
    active output units (task-incremental heads; the head rows outside U then get exactly 0).
    The absolute value is taken per sample, so the result does not depend on how the N samples
    are split into batches. ``batches`` yields (x, y) pairs as for :func:`~masq.importance.fisher`;
    the labels y are not read (their length is checked).

    Cost: parameters of nn.Linear layers (called once per forward on a [B, in] input, not
    shared) use the closed form g_n(W) = delta_n a_n^T, so sum_n |g_n(W)| = |Delta|^T |A| and
    sum_n |g_n(b)| = sum_n |delta_n| (Delta = [delta_n], A = [a_n] of the batch, delta_n =
    d l_n / d z_n = the rows of the summed loss' gradient): one forward and one backward per
    batch. Every other trainable parameter gets per-sample gradients from torch.func (vmap of
    grad) in chunks of at most ``buffer_bytes``; the model must then be vmap-compatible.

    Contract as for every measure: eval mode (samples independent), the model handed back as it
    was (weights, ``.grad``, train/eval and requires_grad flags), sums in float64, the result in
    each parameter's dtype and on its device (``device``: compute on a copy moved there). NaN/inf
    inputs and an ``x`` that does not fit the first linear layer are one-line ConfigErrors.
    """
    diagonal.check_batches(batches)
    check_buffer_bytes(buffer_bytes)
    with evaluating(model, device) as (work, dev):
        params = trainable_params(work)
        sites = linear_sites(work, params)
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
        count = 0
        width, active = input_width(work), active_outputs(outputs, dev)
        with tapped(sites) as taps:
            for index, (x, y) in enumerate(batches):
                check_batch(x, y, index, width, labels=False)
                batch = (x.to(dev), y.to(dev))
                _mas_batch(work, sites, taps, batch, active, sums, index, buffer_bytes)
                count += len(x)
    return finish_importance(sums, count, model)


def mas_measure(model: nn.Module, data: XY, ctx: MeasureContext) -> Importance:
    """The registry's ``mas`` measure: :func:`mas` on ``data`` in batches of ``ctx.batch_size``,
    restricted to the task's units ``ctx.outputs`` in the task-incremental scenario."""
    x, y = data
    data_batches = diagonal.batches(x, y, ctx.batch_size)
    return mas(model, data_batches, device=ctx.device, outputs=ctx.outputs)


MAS = register_measure(
    Measure(
        "mas",
        label="MAS",
        compute=mas_measure,
        standalone=True,
        description="Memory Aware Synapses: mean absolute gradient of the squared output norm",
    )
)
