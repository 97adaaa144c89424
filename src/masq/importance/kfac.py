"""K-FAC and per-layer Fisher blocks: two structured importance measures for nn.Linear layers.

Notation: a layer z = W a + b on an input a [B, in]; ā = [a; 1] (a 1 appended for the bias) and
W̄ = ``[W | b]``, shape ``[out, in+1]``; δ_n = d l_n / d z_n, the gradient of sample n's own
loss with respect to the layer's pre-activations. Sample n's gradient of W̄ is δ_n ā_nᵀ,
flattened row-major kron(δ_n, ā_n). A label term m = (n, t, w) is a sample n with a target t
of weight w (the labels below), and M = N × (label terms per sample). The layer's exact Fisher
block is

    F = (1/N) Σ_m w_m kron(δ_m, ā_m) kron(δ_m, ā_m)ᵀ = E[δδᵀ ⊗ āāᵀ]     (row-major order)

- :func:`kfac_factors` (K-FAC, Martens & Grosse 2015): F ≈ G ⊗ A with A = (1/N) Σ_n ā_n ā_nᵀ
  [in+1, in+1] and G = (1/N) Σ_m w_m δ_m δ_mᵀ [out, out]; the result holds ``"{module}.A"`` and
  ``"{module}.G"`` of every layer. Its penalty (:mod:`masq.consolidation.structured`) uses
  vec(ΔW̄)ᵀ (G ⊗ A) vec(ΔW̄) = trace(ΔW̄ᵀ G ΔW̄ A) and never forms the Kronecker product.
- :func:`layer_fisher_factors` (the "fisher-blocks" measure): F itself, block-diagonal across
  layers and full within one (W and b together), in low-rank form: per sample n its input
  v_n = ā_n and per label term t of it the row u_nt = sqrt(w_nt / N) δ_nt, so that
  F = Σ_n Σ_t kron(u_nt, v_n) kron(u_nt, v_n)ᵀ and vec(ΔW̄)ᵀ F vec(ΔW̄) = Σ_n Σ_t (u_ntᵀ r_n)²
  with r_n = ΔW̄ v_n: the product with the layer's input is formed once per sample, not once
  per label term. The result holds ``"{module}.U"`` [N, T, out] (T label terms per sample: C
  for "exact", 1 otherwise) and ``"{module}.V"`` [N, in+1]; the P × P block is never formed.

Labels (:class:`~masq.config.FisherLabels`), as for :func:`masq.importance.fisher`: "empirical"
(the data's label, w = 1), "sample" (one label per sample drawn from softmax(logits) by one
``torch.multinomial`` per batch with ``generator``), "exact" (every class c with w = p_c(x_n),
the probabilities taken as constants: C terms per sample), "predicted" (argmax_c p_c(x_n)).
"batched" (a squared batch mean) has no per-sample structure and is refused.

A parameter that is frozen leaves its part out: a frozen bias drops the 1 from ā, a frozen
weight leaves ā = [1]. Every trainable parameter must belong to a plain nn.Linear, owned by no
other module and called once per forward on a [B, in] input: K-FAC here covers Linear layers
only (a conv, a norm layer or a shared weight is a one-line ConfigError).

Cost per sample: one forward and, per label term, one backward of the summed batch loss (C for
"exact"); hooks record ā_n and δ_n. K-FAC then adds (in+1)² + (terms) × out² multiply-adds per
layer; the blocks only keep the rows. Memory of the result per layer: K-FAC (in+1)² + out²
floats; blocks N (in+1) + N T out floats. Products run in
the parameters' dtype per batch, the sums of A and G in float64; results come back in the dtype
and on the device of each layer's weight. The model is used in eval mode and handed back as it
was found (weights, grads, modes), as every measure of :mod:`masq.importance`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from masq.config import FisherLabels, choice
from masq.errors import ConfigError

# the label terms of the Fisher variants: one definition, shared with the diagonal Fisher
from masq.importance.diagonal import batches, cross_entropy, label_terms, subset
from masq.importance.gradients import (
    LinearSite,
    LinearTap,
    linear_deltas,
    linear_sites,
    tapped,
)
from masq.importance.measures import fisher_label
from masq.importance.persample import (
    ActiveOutputs,
    Importance,
    active_outputs,
    check_batch,
    check_values,
    evaluating,
    input_width,
    per_sample_losses,
    trainable_params,
)
from masq.importance.registry import Measure, MeasureContext, register_measure
from masq.tasks import XY

__all__ = [
    "FISHER_BLOCKS",
    "KFAC",
    "KFAC_LABELS",
    "augmented",
    "blocks_label",
    "factor_key",
    "fisher_blocks_measure",
    "kfac_factors",
    "kfac_label",
    "kfac_labels",
    "kfac_measure",
    "layer_fisher_factors",
    "linear_layers",
    "stacked",
]

KFAC_LABELS: tuple[FisherLabels, ...] = (
    FisherLabels.EMPIRICAL,
    FisherLabels.SAMPLE,
    FisherLabels.EXACT,
    FisherLabels.PREDICTED,
)
"""The label kinds with a per-sample structure (every one but "batched")."""


def kfac_labels(labels: FisherLabels | str) -> FisherLabels:
    """``labels`` as a member of :data:`KFAC_LABELS`, else a one-line ConfigError."""
    mode = choice(FisherLabels, labels, "labels")
    if mode not in KFAC_LABELS:
        valid = ", ".join(m.value for m in KFAC_LABELS)
        raise ConfigError(
            f"labels={mode.value!r} has no per-sample gradients, so K-FAC and Fisher blocks do "
            f"not define it; use one of {valid}"
        )
    return mode


def factor_key(module: str, factor: str) -> str:
    """The importance key of ``factor`` ("A", "G", "U", "V") of layer ``module``: "0.A"."""
    return f"{module}.{factor}" if module else factor


def linear_layers(model: nn.Module) -> dict[str, LinearSite]:
    """The nn.Linear layers holding the trainable parameters, by module name; a one-line
    ConfigError when a trainable parameter is not part of a plain nn.Linear of its own."""
    params = trainable_params(model)
    sites = linear_sites(model, params)
    covered = {n for site in sites.values() for n in site.names}
    stray = [n for n in params if n not in covered]
    if stray:
        raise ConfigError(
            f"K-FAC and Fisher blocks cover nn.Linear layers only, but {stray[:3]} belong to "
            "other modules (or shared weights); freeze them (requires_grad=False) or use a "
            "diagonal measure"
        )
    return sites


def augmented(a: Tensor, site: LinearSite) -> Tensor:
    """ā [B, cols]: the layer input a [B, in] where the weight is trainable, then a column of
    ones where the bias is; cols = in + 1 for a fully trainable layer."""
    parts = [a] if site.weight is not None else []
    if site.bias is not None:
        parts.append(torch.ones(len(a), 1, dtype=a.dtype, device=a.device))
    return torch.cat(parts, dim=1)


def stacked(weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """W̄ = ``[W | b]``, shape ``[out, cols]``, of the trainable parts (None: frozen or absent)."""
    parts = [] if weight is None else [weight]
    if bias is not None:
        parts.append(bias[:, None])
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------ the pass


@dataclass(frozen=True)
class _Pass:
    """What stays fixed over the batches of one pass."""

    model: nn.Module
    sites: dict[str, LinearSite]
    taps: dict[str, LinearTap]
    mode: FisherLabels
    generator: torch.Generator | None
    active: ActiveOutputs | None

    @property
    def empirical(self) -> bool:
        """Whether the data's labels are read (and so checked)."""
        return self.mode is FisherLabels.EMPIRICAL


@dataclass(frozen=True)
class _Batch:
    """One batch's ā per layer and its label terms' δ, to be read once in order."""

    size: int
    inputs: dict[str, Tensor]  # ā [B, cols] by module
    terms: Iterator[tuple[dict[str, Tensor], Tensor | None]]  # ({module: δ [B, out]}, w)


def _forward(run: _Pass, x: Tensor, y: Tensor, index: int) -> _Batch:
    """Forward batch ``index`` with the taps on; its ā and (lazily) one backward per term."""
    for tap in run.taps.values():
        tap.reset()
    logits = run.model(x)
    if run.active is not None:
        logits = run.active.select(logits)
    if logits.ndim != 2:
        raise ConfigError(
            f"K-FAC needs logits of shape [B, classes], got {tuple(logits.shape)}; end the "
            "model with an nn.Linear on [B, features]"
        )
    units = run.active if run.empirical else None
    check_values(x, y, logits, index, run.empirical, units)
    if units is not None:
        y = units.positions(y)
    inputs = {}
    for m, tap in run.taps.items():
        if not tap.clean(len(x)) or tap.input is None:
            raise ConfigError(
                f"layer {m!r} ran {tap.calls} times or on an input that is not [B, in]; K-FAC "
                "and Fisher blocks need each nn.Linear called once per forward on [B, in]"
            )
        inputs[m] = augmented(tap.input, run.sites[m])
    terms = label_terms(logits, y, run.mode, run.generator)
    return _Batch(len(x), inputs, _deltas(run, logits, terms))


def _deltas(
    run: _Pass, logits: Tensor, terms: list[tuple[Tensor, Tensor | None]]
) -> Iterator[tuple[dict[str, Tensor], Tensor | None]]:
    """Per label term: ({module: δ [B, out]} of the layers the loss reaches, weights)."""
    for i, (targets, weight) in enumerate(terms):
        losses = per_sample_losses(cross_entropy, logits, targets)
        found = linear_deltas(losses, run.taps, run.sites, retain=i + 1 < len(terms))
        for tap in run.taps.values():
            tap.delta = None
        yield {m: d for m, d in found.items() if d is not None}, weight


def _run(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    labels: FisherLabels | str,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    outputs: Sequence[int] | Tensor | None,
) -> Iterator[_Batch]:
    """The checked batches of one pass, the model in eval mode (read each before the next)."""
    mode = kfac_labels(labels)
    if mode is FisherLabels.SAMPLE and generator is None:
        raise ConfigError(
            "labels='sample' needs generator=torch.Generator().manual_seed(SEED) for the draws"
        )
    with evaluating(model, device) as (work, dev):
        sites = linear_layers(work)
        width, active = input_width(work), active_outputs(outputs, dev)
        with tapped(sites) as taps:
            run = _Pass(work, sites, taps, mode, generator, active)
            units = active if run.empirical else None
            for index, (x, y) in enumerate(batches):
                check_batch(x, y, index, width, run.empirical, units)
                yield _forward(run, x.to(dev), y.to(dev), index)


def _home(model: nn.Module, site: LinearSite) -> Tensor:
    """The caller's parameter whose dtype and device the layer's factors take (the weight,
    or the bias where the weight is frozen)."""
    return model.get_parameter(site.names[0])


def _check_count(count: int) -> None:
    """A one-line ConfigError when the pass saw no samples."""
    if count == 0:
        raise ConfigError("batches yielded nothing; pass at least one (x, y) batch")


# ---------------------------------------------------------------------------- the measures


def kfac_factors(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: FisherLabels | str = FisherLabels.EXACT,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    outputs: Sequence[int] | Tensor | None = None,
) -> Importance:
    """K-FAC's factors of every nn.Linear layer: {"{module}.A": A, "{module}.G": G} with

        A = (1/N) Σ_n ā_n ā_nᵀ   [in+1, in+1],    G = (1/N) Σ_n Σ_t w_nt δ_nt δ_ntᵀ   [out, out]

    so that the layer's Fisher block is approximated by G ⊗ A (module docstring; ``labels``
    give the terms t and weights w). ``outputs`` (task-incremental heads): the logits are
    model(x)[U] and the labels positions in U, as in :func:`masq.importance.fisher`. The sums
    are float64; the factors come back in the dtype and on the device of the layer's weight.
    """
    sites = linear_layers(model)
    sums: dict[str, tuple[Tensor, Tensor]] = {}
    count = 0
    for batch in _run(model, batches, labels, generator, device, outputs):
        for m, a in batch.inputs.items():
            if m not in sums:
                out = sites[m].module.out_features
                cols = a.shape[1]
                sums[m] = (
                    a.new_zeros(cols, cols, dtype=torch.float64),
                    a.new_zeros(out, out, dtype=torch.float64),
                )
            sums[m][0].add_(a.T @ a)
        for deltas, weight in batch.terms:
            for m, d in deltas.items():
                dw = d if weight is None else d * weight[:, None]
                sums[m][1].add_(dw.T @ d)
        count += batch.size
    _check_count(count)
    result = {}
    for m, (a_sum, g_sum) in sums.items():
        home = _home(model, sites[m])
        result[factor_key(m, "A")] = (a_sum / count).to(home)
        result[factor_key(m, "G")] = (g_sum / count).to(home)
    return result


def layer_fisher_factors(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: FisherLabels | str = FisherLabels.EXACT,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    outputs: Sequence[int] | Tensor | None = None,
) -> Importance:
    """The exact per-layer Fisher blocks in low-rank form: {"{module}.U": U, "{module}.V": V}
    with one row of V per sample n and T rows of U per sample (its label terms t, weights w):

        v_n = ā_n  (V [N, in+1]),   u_nt = sqrt(w_nt / N) δ_nt  (U [N, T, out]),
        F_layer = Σ_n Σ_t kron(u_nt, v_n) kron(u_nt, v_n)ᵀ = (1/N) Σ_n Σ_t w_nt (δ ā_nᵀ)(δ ā_nᵀ)ᵀ

    (flattened row-major; module docstring). Samples come in pass order; U and V are in the
    dtype and on the device of the layer's weight. ``outputs`` as for :func:`kfac_factors`.
    """
    sites = linear_layers(model)
    rows: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    count = 0
    for batch in _run(model, batches, labels, generator, device, outputs):
        terms: dict[str, list[Tensor]] = {}
        for deltas, weight in batch.terms:
            for m, d in deltas.items():
                terms.setdefault(m, []).append(d if weight is None else d * weight.sqrt()[:, None])
        for m, parts in terms.items():
            us, vs = rows.setdefault(m, ([], []))
            us.append(torch.stack(parts, dim=1))  # [B, T, out]
            vs.append(batch.inputs[m])
        count += batch.size
    _check_count(count)
    result = {}
    for m, site in sites.items():
        home = _home(model, site)
        us, vs = rows.get(m, ([], []))
        cols = (site.module.in_features if site.weight else 0) + (1 if site.bias else 0)
        u = torch.cat(us) if us else home.new_zeros(0, 1, site.module.out_features)
        v = torch.cat(vs) if vs else home.new_zeros(0, cols)
        del us[:], vs[:]  # free the parts once joined
        result[factor_key(m, "U")] = u.mul_(1 / math.sqrt(count)).to(home)  # u: a new tensor
        result[factor_key(m, "V")] = v.to(home)
    return result


def kfac_measure(model: nn.Module, data: XY, ctx: MeasureContext) -> Importance:
    """:func:`kfac_factors` of ``model`` on ``data`` (a subset of ``fisher_samples`` of it, 0:
    all) in batches of the pass's batch size, labels from ``fisher_labels``."""
    return kfac_factors(model, **_pass_arguments(data, ctx))


def fisher_blocks_measure(model: nn.Module, data: XY, ctx: MeasureContext) -> Importance:
    """:func:`layer_fisher_factors` of ``model`` on ``data``, as :func:`kfac_measure`."""
    return layer_fisher_factors(model, **_pass_arguments(data, ctx))


def _pass_arguments(data: XY, ctx: MeasureContext) -> dict[str, Any]:
    """The keyword arguments of one measure pass from the context."""
    x, y = subset(data[0], data[1], ctx.settings["fisher_samples"], ctx.generator)
    return {
        "batches": batches(x, y, ctx.batch_size),
        "labels": ctx.settings["fisher_labels"],
        "generator": ctx.generator,
        "device": ctx.device,
        "outputs": ctx.outputs,
    }


def kfac_label(values: Mapping[str, Any], detailed: bool = False) -> str:
    """ "K-FAC" (empirical labels), "K-FAC (exact)", "K-FAC (sample, n=500)": the labels as
    :func:`~masq.importance.measures.fisher_label` names them."""
    return "K-FAC" + fisher_label(values, detailed).removeprefix("FIM")


def blocks_label(values: Mapping[str, Any], detailed: bool = False) -> str:
    """ "FIM blocks", "FIM blocks (exact)", ...: as :func:`kfac_label`."""
    return "FIM blocks" + fisher_label(values, detailed).removeprefix("FIM")


KFAC = register_measure(
    Measure(
        "kfac",
        label=kfac_label,
        compute=kfac_measure,
        fields=("fisher_labels", "fisher_samples"),
        kind="kfac",
        description="K-FAC: Kronecker factors G ⊗ A of each Linear layer's Fisher block",
    )
)
FISHER_BLOCKS = register_measure(
    Measure(
        "fisher-blocks",
        label=blocks_label,
        compute=fisher_blocks_measure,
        fields=("fisher_labels", "fisher_samples"),
        kind="fisher-blocks",
        layout=2,  # 2: blocks as V [N, cols] and U [N, T, out]
        description="the exact Fisher block of each Linear layer (W and b), in low-rank form",
    )
)
