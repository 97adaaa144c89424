"""The paper's measures in the registry: the diagonal Fisher (``fisher``), MaSQ (``masq``) and
no importance (``none``). Their formulas: :mod:`masq.importance.diagonal`.

- ``fisher``: F_k = (1/N) Σ_n g_nk², g_n the gradient of sample n's own loss; the labels from
  ``fisher_labels`` (empirical: the data's / sample: drawn from the model with the context's
  generator / exact: the expectation over the classes / predicted: the argmax), or
  ``batched``: (1/K) Σ_b ḡ_bk² over batches of b = ``masq_batch`` (MaSQ mean). Otherwise the
  pass runs in batches of ``masq_batch`` samples, which bounds memory and does not enter the
  formula. ``fisher_samples`` > 0 takes a seeded random subset of that many samples.
- ``masq``: F_k = (1/K) Σ_b ḡ_bk² (``scale`` mean) or (1/K) Σ_b |b| ḡ_bk² (``scale`` sum) over
  the K batches of ``masq_batch`` samples; ḡ_b the gradient of the batch-mean loss.
- ``none``: no importance: plain fine-tuning (λ has no effect).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from masq.config import FisherLabels, choice
from masq.importance.diagonal import batches, fisher, masq, subset
from masq.importance.registry import Importance, Measure, MeasureContext, register_measure
from masq.tasks import XY


def fisher_measure(model: nn.Module, data: XY, ctx: MeasureContext) -> Importance:
    """The diagonal Fisher of ``model`` on ``data`` (:func:`masq.importance.fisher`), on a
    seeded subset of ``fisher_samples`` of them where that is > 0
    (:func:`masq.importance.diagonal.subset`, drawn from the context's generator before any
    label is)."""
    x, y = subset(*data, int(ctx.settings.get("fisher_samples", 0)), ctx.generator)
    return fisher(
        model,
        batches(x, y, ctx.batch_size),
        labels=ctx.settings["fisher_labels"],
        generator=ctx.generator,
        device=ctx.device,
        outputs=ctx.outputs,
    )


def masq_measure(model: nn.Module, data: XY, ctx: MeasureContext) -> Importance:
    """MaSQ of ``model`` on ``data`` in batches of ``masq_batch`` (:func:`masq.importance.masq`)."""
    x, y = data
    return masq(
        model,
        batches(x, y, ctx.settings["masq_batch"]),
        scale=ctx.settings["scale"],
        device=ctx.device,
        outputs=ctx.outputs,
    )


def fisher_label(values: Mapping[str, Any], detailed: bool = False) -> str:
    """ "FIM" (empirical labels: the paper's), else "FIM (sample)", "FIM (exact)", "FIM
    (predicted)", "FIM (batched, b=128)"; a subset adds its size: "FIM (exact, n=500)"."""
    labels = choice(FisherLabels, values.get("fisher_labels", "empirical"), "fisher_labels")
    parts = [] if labels is FisherLabels.EMPIRICAL else [labels.value]
    if labels is FisherLabels.BATCHED:
        parts[-1] += f", b={int(values.get('masq_batch', 1000))}"
    if int(values.get("fisher_samples", 0) or 0) > 0:
        parts.append(f"n={int(values['fisher_samples'])}")
    return "FIM" + (f" ({', '.join(parts)})" if parts else "")


def masq_label(values: Mapping[str, Any], detailed: bool = False) -> str:
    """ "MaSQ (mean)", "MaSQ (sum)"; ``detailed`` adds B_MaSQ: "MaSQ (mean, B=1000)"."""
    extra = f", B={int(values['masq_batch'])}" if detailed else ""
    return f"MaSQ ({values.get('scale', 'mean')}{extra})"


def fisher_more_fields(config: Any) -> tuple[str, ...]:
    """``("masq_batch",)`` for batched labels (the pass's batch size is then b), else ()."""
    labels = choice(FisherLabels, getattr(config, "fisher_labels", "empirical"), "fisher_labels")
    return ("masq_batch",) if labels is FisherLabels.BATCHED else ()


FISHER = register_measure(
    Measure(
        "fisher",
        label=fisher_label,
        compute=fisher_measure,
        fields=("fisher_labels", "fisher_samples"),
        more_fields=fisher_more_fields,
        description="the diagonal Fisher from exact per-sample gradients (the paper's FIM); "
        "labels empirical | sample | exact | predicted | batched",
    )
)
MASQ = register_measure(
    Measure(
        "masq",
        label=masq_label,
        compute=masq_measure,
        fields=("masq_batch", "scale"),
        description="the Matrix of SQuares: squared batch-mean gradients (Gepperth & Wiech)",
    )
)
NONE = register_measure(
    Measure("none", label="none", description="no importance: plain fine-tuning")
)

__all__ = ["FISHER", "MASQ", "NONE", "fisher_label", "fisher_measure", "masq_label", "masq_measure"]
