"""The model handling and input checks shared by every measure of the package.

Notation: a batch of B samples x_n with labels y_n, per-sample losses l_n = loss(model(x_n), y_n)
and per-sample gradients g_n = d l_n / d theta (computed in :mod:`~masq.importance.gradients`).

This module and :mod:`~masq.importance.gradients` are the internal API of
:mod:`masq.importance`: the measures (``diagonal``, ``mas``, ``blocks``, ``kfac``,
``reference``) import the names of their ``__all__`` and nothing private. Users reach
:data:`Importance`, :data:`LossFn` and the measures through the package.

- model handling: :func:`trainable_params`, :func:`placement`, :func:`evaluating`,
  :func:`finish_importance`;
- input checks: :func:`input_width`, :func:`check_batch`, :func:`check_values`,
  :func:`check_buffer_bytes`, :func:`per_sample_losses`;
- task-incremental heads: :class:`ActiveOutputs`, :func:`active_outputs`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor, nn

from masq.errors import ConfigError
from masq.runtime import torch_device

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "ActiveOutputs",
    "Importance",
    "LossFn",
    "active_outputs",
    "check_batch",
    "check_buffer_bytes",
    "check_values",
    "evaluating",
    "finish_importance",
    "input_width",
    "per_sample_losses",
    "placement",
    "trainable_params",
]

Importance = dict[str, Tensor]
"""Importance per trainable parameter, keyed and shaped like ``model.named_parameters()``."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(logits, y) -> per-sample losses`` of shape ``[B]`` (reduction "none")."""

DEFAULT_BUFFER_BYTES = 64 * 2**20
"""Default bound on the temporaries of one chunk of samples (per-sample gradients of the
torch.func path, feature buffers of the block statistics): the ``buffer_bytes=`` of the public
functions. It changes memory and the grouping of float sums, never the formula."""


def check_buffer_bytes(buffer_bytes: int) -> int:
    """``buffer_bytes`` if it is a positive int, else a one-line ConfigError."""
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 1:
        raise ConfigError(f"buffer_bytes must be a positive integer, got {buffer_bytes!r}")
    return buffer_bytes


# --------------------------------------------------------------------------- model handling


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with ``requires_grad``, by name; a ConfigError when there are none."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters; set requires_grad on some")
    return params


def _resolve(device: torch.device) -> torch.device:
    """``device`` with its index filled in ("cuda" -> "cuda:0"), as tensors report it."""
    return torch.empty(0, device=device).device


def placement(model: nn.Module, device: torch.device | str | None) -> tuple[torch.device, bool]:
    """(the device to compute on, whether that needs a copy of the model).

    ``None`` means the device of the model's trainable parameters: no copy. Another device
    needs a copy of the model moved there.
    """
    home = next(iter(trainable_params(model).values())).device
    if device is None:
        return home, False
    target = _resolve(torch_device(device))  # a device this machine lacks: one line
    return target, target != _resolve(home)


@contextlib.contextmanager
def evaluating(
    model: nn.Module, device: torch.device | str | None
) -> Iterator[tuple[nn.Module, torch.device]]:
    """Yield (the model to compute with, in eval mode, on ``device``; that device).

    On the model's own device that is the model itself, its train/eval flags restored on exit;
    on another device it is a copy moved there (:func:`placement`), and the caller's model is not
    touched at all.
    """
    target, moved = placement(model, device)
    work = copy.deepcopy(model).to(target) if moved else model
    modes = [(m, m.training) for m in work.modules()]
    work.eval()
    try:
        yield work, target
    finally:
        for m, mode in modes:
            m.training = mode


def finish_importance(sums: dict[str, Tensor], count: int, model: nn.Module) -> Importance:
    """F = sums / count, each in the dtype and on the device of the model's parameter of that
    name; a ConfigError when ``count`` is 0 (the batches yielded nothing)."""
    if count == 0:
        raise ConfigError("batches yielded nothing; pass at least one (x, y) batch")
    params = trainable_params(model)
    return {
        n: (s / count).to(dtype=params[n].dtype, device=params[n].device) for n, s in sums.items()
    }


def per_sample_losses(loss: LossFn, logits: Tensor, targets: Tensor) -> Tensor:
    """l_n = loss(logits, targets), checked to hold one loss per sample (shape [B])."""
    losses = loss(logits, targets)
    if losses.shape != (logits.shape[0],):
        raise ConfigError(
            f"loss must return one loss per sample, shape ({logits.shape[0]},), got "
            f"{tuple(losses.shape)}; use reduction='none'"
        )
    return losses


# ------------------------------------------------------------------- task-incremental heads


@dataclass(frozen=True, eq=False)
class ActiveOutputs:
    """The active output units of one task (task-incremental scenario: the units of the other
    tasks are masked).

    With U = ``units`` (u_1, ..., u_m), logits z [B, C] of the full head become
    z[:, U] = (z_{u_1}, ..., z_{u_m}) [B, m], and a label y_n (a unit of the full head, y_n = u_j)
    becomes its position j among the units, so that the measure sees an m-class problem.
    """

    units: tuple[int, ...]
    index: Tensor  # the units as a long tensor on the device of the computation

    def select(self, logits: Tensor) -> Tensor:
        """z[:, units] of logits z [B, C]; a one-line ConfigError when a unit is >= C.

        Works inside torch.func transforms (no data-dependent control flow)."""
        if logits.ndim != 2:
            raise ConfigError(
                f"outputs: the model's logits have shape {tuple(logits.shape)}; selecting "
                "output units needs logits [B, C]"
            )
        if max(self.units) >= logits.shape[1]:
            raise ConfigError(
                f"outputs: unit {max(self.units)} does not exist; the model has "
                f"{logits.shape[1]} outputs (units 0..{logits.shape[1] - 1})"
            )
        return logits[:, self.index]

    def restrict(self, loss: LossFn) -> LossFn:
        """The loss l(z, t) = loss(z[:, units], t) on the logits of the full head."""

        def restricted(logits: Tensor, targets: Tensor) -> Tensor:
            return loss(self.select(logits), targets)

        return restricted

    def positions(self, y: Tensor) -> Tensor:
        """j with units[j] = y_n for every label (labels must be among the units,
        :func:`check_values`; any other label gets 0)."""
        return (y[:, None] == self.index[None, :]).int().argmax(1)


def active_outputs(
    outputs: Sequence[int] | Tensor | None, device: torch.device
) -> ActiveOutputs | None:
    """``outputs`` (distinct non-negative unit indices, a sequence or a 1-D integer tensor) as
    :class:`ActiveOutputs` on ``device``; None for None. A one-line ConfigError otherwise."""
    if outputs is None:
        return None
    if isinstance(outputs, Tensor):
        if outputs.ndim != 1 or outputs.is_floating_point() or outputs.dtype == torch.bool:
            raise ConfigError(
                f"outputs: give a 1-D integer tensor or a sequence of ints, got a tensor of "
                f"shape {tuple(outputs.shape)} and dtype {outputs.dtype}"
            )
        units = tuple(int(u) for u in outputs.tolist())
    else:
        values = list(outputs)
        if not all(isinstance(u, Integral) and not isinstance(u, bool) for u in values):
            raise ConfigError(f"outputs: give output unit indices (ints), got {values!r}")
        units = tuple(int(u) for u in values)
    if not units:
        raise ConfigError("outputs: give at least one output unit (None: all of them)")
    if min(units) < 0 or len(set(units)) != len(units):
        raise ConfigError(f"outputs: give distinct non-negative unit indices, got {list(units)}")
    return ActiveOutputs(units, torch.tensor(units, dtype=torch.long, device=device))


# ------------------------------------------------------------------------------ input checks
#
# Once per batch, no loop over samples: shapes from metadata before the forward pass, then the
# values (finite inputs, labels in range) in two reductions and one host sync after it.


def input_width(model: nn.Module) -> int | None:
    """``in_features`` of the first layer when ``model`` is an ``nn.Sequential`` (possibly
    nested) that starts with an ``nn.Linear``; None when the width cannot be read off."""
    first: nn.Module = model
    while isinstance(first, nn.Sequential) and len(first) > 0:
        first = first[0]
    return first.in_features if isinstance(first, nn.Linear) else None


def check_batch(
    x: object,
    y: object,
    index: int,
    width: int | None,
    labels: bool,
    units: ActiveOutputs | None = None,
) -> None:
    """A one-line ConfigError unless batch ``index`` is a pair of tensors of equal length
    and not empty (an empty batch would count in MaSQ's K: one of two halves the result),
    ``x`` has shape [B, ..., width] where the model's input ``width`` is known, (``labels``:
    the class labels of the default cross-entropy) ``y`` is integer or soft labels [B, C], and
    (``units``: labels to be mapped to positions among these output units) ``y`` is integer."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ConfigError(
            f"batches: batch {index} is ({type(x).__name__}, {type(y).__name__}); yield "
            "(x, y) pairs of tensors, e.g. importance.batches(x, y, batch_size)"
        )
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ConfigError(
            f"batches: batch {index} has x of shape {tuple(x.shape)} and y of shape "
            f"{tuple(y.shape)}; pass one label per sample (x [B, ...], y [B])"
        )
    if len(x) == 0:  # it would count in K (MaSQ's mean over batches) with a zero gradient
        raise ConfigError(
            f"batches: batch {index} is empty (x of shape {tuple(x.shape)}); pass batches of "
            "at least one sample (drop the empty ones)"
        )
    if width is not None and (x.ndim < 2 or x.shape[-1] != width):
        raise ConfigError(
            f"x: batch {index} has shape {tuple(x.shape)} but the model's first layer takes "
            f"[B, {width}]; pass inputs with {width} features (flattened images)"
        )
    if labels and (y.dtype == torch.bool or (y.is_floating_point() and y.ndim == 1)):
        raise ConfigError(
            f"y: batch {index} has labels of dtype {y.dtype}; class labels are integers (y.long())"
        )
    soft = y.is_floating_point() and y.ndim == 2 and y.shape[1] > 1
    if labels and y.ndim != 1 and not soft:  # torch's cross-entropy: "multi-target not supported"
        raise ConfigError(
            f"y: batch {index} has labels of dtype {y.dtype} and shape {tuple(y.shape)}; the "
            "cross-entropy takes class indices y [B] (y.squeeze(1); one-hot: y.argmax(1)) or "
            "float class probabilities [B, C]"
        )
    if units is not None and (y.dtype == torch.bool or y.is_floating_point() or y.ndim != 1):
        raise ConfigError(
            f"y: batch {index} has labels of dtype {y.dtype} and shape {tuple(y.shape)}; with "
            "outputs= the labels are integer output units of the full head, y [B]"
        )


def check_values(
    x: Tensor,
    y: Tensor,
    logits: Tensor,
    index: int,
    labels: bool,
    units: ActiveOutputs | None = None,
) -> None:
    """A one-line ConfigError when batch ``index`` holds NaN/inf inputs, (``labels``: the
    integer labels of a cross-entropy) a label outside 0..C-1, C = logits.shape[-1], or soft
    labels [B, C'] with C' != C, or
    (``units``: labels given as units of the full head) a label not among ``units``.

    Cheap: the sum of ``x`` is finite exactly when every entry is (barring an overflow of
    huge values, told apart on the error path only), so it takes one reduction of x, one of the
    labels and one host sync.
    """
    classes = logits.shape[-1] if logits.ndim >= 1 else 0
    if labels and y.is_floating_point() and y.ndim == 2 and y.shape[1] != classes:
        raise ConfigError(
            f"y: batch {index} has class probabilities for {y.shape[1]} classes but the model "
            f"has {classes} outputs; give y [B, {classes}]"
        )
    flags = [torch.isfinite(x.sum())] if x.is_floating_point() else []
    if units is not None and y.numel() > 0:
        flags.append(torch.isin(y, units.index).all())
    elif labels and not y.is_floating_point() and y.numel() > 0:
        flags.append(((y >= 0) & (y < classes)).all())
    if not flags:
        return
    values = torch.stack(flags).tolist()
    if x.is_floating_point() and not values.pop(0):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ConfigError(
                f"x: batch {index} holds {bad} NaN or inf values, which make the importance NaN; "
                "clean or drop those samples"
            )
    if values and not values[0] and units is not None:
        stray = sorted(set(y[~torch.isin(y, units.index)].tolist()))
        raise ConfigError(
            f"y: batch {index} has labels {stray[:5]} not among the task's output units "
            f"{list(units.units)}; pass this task's samples only, or its units in outputs="
        )
    if values and not values[0]:
        raise ConfigError(
            f"y: batch {index} has labels from {int(y.min())} to {int(y.max())} but the model "
            f"has {classes} outputs (labels 0..{classes - 1}); map the labels to "
            f"0..{classes - 1} or give the model more outputs"
        )
