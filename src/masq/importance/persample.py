"""Per-sample gradients, and the model handling shared by every measure of the package.

Notation: a batch of B samples x_n with labels y_n, per-sample losses l_n = loss(model(x_n), y_n)
and per-sample gradients g_n = d l_n / d theta.

Two ways to the g_n (or to sums of functions of them: squares for
:func:`~masq.importance.fisher`, absolute values for :func:`~masq.importance.mas`):

- Closed form for ``nn.Linear`` (z = W a + b on a [B, in] input): g_n(W) = delta_n a_n^T and
  g_n(b) = delta_n with delta_n = d l_n / d z_n. One backward pass of the SUMMED loss sum_n l_n
  yields every delta_n unscaled (row n of dL/dz); hooks record a_n and delta_n
  (:func:`linear_sites`, :func:`tapped`, :class:`LinearTap`, :func:`linear_deltas`).
- Any other module: torch.func, vmap over the samples of grad of the single-sample loss
  (:func:`generic_grads`), in chunks of at most ``buffer_bytes`` of gradients.

This module is the internal API of :mod:`masq.importance`: the measures (``diagonal``, ``mas``,
``blocks``, ``reference``) import the names of ``__all__`` below and nothing private. Users reach
:data:`Importance`, :data:`LossFn` and the measures through the package.

- model handling: :func:`trainable_params`, :func:`placement`, :func:`evaluating`,
  :func:`finish_importance`;
- input checks: :func:`input_width`, :func:`check_batch`, :func:`check_values`,
  :func:`check_buffer_bytes`, :func:`per_sample_losses`;
- task-incremental heads: :class:`ActiveOutputs`, :func:`active_outputs`;
- per-sample gradients: :class:`LinearSite`, :func:`linear_sites`, :class:`LinearTap`,
  :func:`tapped`, :func:`paused`, :func:`linear_deltas`, :func:`generic_grads`.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from masq.errors import ConfigError
from masq.runtime import torch_device

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "ActiveOutputs",
    "Importance",
    "LinearSite",
    "LinearTap",
    "LossFn",
    "active_outputs",
    "check_batch",
    "check_buffer_bytes",
    "check_values",
    "evaluating",
    "finish_importance",
    "generic_grads",
    "input_width",
    "linear_deltas",
    "linear_sites",
    "paused",
    "per_sample_losses",
    "placement",
    "tapped",
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


# ------------------------------------------------------ per-sample gradients of nn.Linear layers
#
# For a linear layer z = W a + b applied once to a 2-D input [B, in], sample n's gradient is
# g_n(W) = delta_n a_n^T and g_n(b) = delta_n, with delta_n = d l_n / d z_n. With the SUMMED loss
# sum_n l_n one backward pass yields every delta_n (row n of dL/dz) unscaled. A forward hook keeps
# a_n and registers a tensor hook on z that receives dL/dz; the hook is placed before any later
# in-place operation (ReLU(inplace=True)), so it sees the gradient of the layer's own output.
#
# Use: sites = linear_sites(model, params); with tapped(sites) as taps: per batch, tap.reset()
# for every tap, forward, keep the taps with tap.clean(B), linear_deltas(losses, clean, sites),
# then read tap.input (a) and the deltas; every other parameter goes through generic_grads
# inside paused(taps).


@dataclass(frozen=True)
class LinearSite:
    """An nn.Linear whose trainable parameters no other module shares: the closed form
    g_n(W) = delta_n a_n^T, g_n(b) = delta_n applies to it (when called once per forward on a
    [B, in] input, :meth:`LinearTap.clean`)."""

    module: nn.Linear
    weight: str | None  # full parameter names, None where frozen or absent
    bias: str | None

    @property
    def names(self) -> tuple[str, ...]:
        """The full names of the layer's trainable parameters (weight first)."""
        return tuple(n for n in (self.weight, self.bias) if n is not None)

    @property
    def anchor(self) -> nn.Parameter:
        """The parameter whose gradient is requested so that backward runs through the layer.

        The bias is preferred: its gradient costs a column sum, the weight's a matrix product.
        """
        return cast(nn.Parameter, self.module.bias if self.bias is not None else self.module.weight)


def linear_sites(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, LinearSite]:
    """The nn.Linear modules (by module name) eligible for the closed form: plain
    ``nn.Linear.forward``, parameters owned by no other module, at least one of them among
    ``params`` (the trainable ones, :func:`trainable_params`)."""
    owners = Counter(
        id(p)
        for _, m in model.named_modules(remove_duplicate=False)
        for p in m.parameters(recurse=False)
    )
    sites = {}
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
            continue
        own = list(m.parameters(recurse=False))
        if any(owners[id(p)] != 1 for p in own):
            continue
        prefix = f"{mname}." if mname else ""
        weight = f"{prefix}weight" if f"{prefix}weight" in params else None
        bias = f"{prefix}bias" if f"{prefix}bias" in params else None
        if weight or bias:
            sites[mname] = LinearSite(m, weight, bias)
    return sites


class LinearTap:
    """Records the input a [B, in] and the output gradient delta = dL/dz [B, out] of one
    nn.Linear during a batch (``input``, ``delta``; ``calls`` counts its forwards)."""

    def __init__(self, module: nn.Linear) -> None:
        self.enabled = True
        self.calls = 0
        self.input: Tensor | None = None
        self.delta: Tensor | None = None
        self._handle = module.register_forward_hook(self._on_forward, with_kwargs=True)

    def _on_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> None:
        if not self.enabled:
            return
        self.calls += 1
        inp = args[0] if args else kwargs.get("input")
        self.input = inp.detach() if isinstance(inp, Tensor) else None
        if output.requires_grad:
            output.register_hook(self._on_grad)

    def _on_grad(self, g: Tensor) -> None:
        self.delta = g

    def reset(self) -> None:
        """Forget the last batch (call before its forward pass)."""
        self.calls, self.input, self.delta = 0, None, None

    def clean(self, batch_size: int) -> bool:
        """Whether the closed form holds: called once, on a [batch_size, in] input."""
        a = self.input
        return self.calls == 1 and a is not None and a.ndim == 2 and a.shape[0] == batch_size

    def remove(self) -> None:
        """Remove the forward hook."""
        self._handle.remove()


@contextlib.contextmanager
def paused(taps: dict[str, LinearTap]) -> Iterator[None]:
    """Switch the taps off (for the torch.func forward passes)."""
    for tap in taps.values():
        tap.enabled = False
    try:
        yield
    finally:
        for tap in taps.values():
            tap.enabled = True


@contextlib.contextmanager
def tapped(sites: dict[str, LinearSite]) -> Iterator[dict[str, LinearTap]]:
    """A tap on every site, by module name; the hooks are removed on exit."""
    taps = {name: LinearTap(site.module) for name, site in sites.items()}
    try:
        yield taps
    finally:
        for tap in taps.values():
            tap.remove()


def linear_deltas(
    losses: Tensor, taps: dict[str, LinearTap], sites: dict[str, LinearSite], retain: bool
) -> dict[str, Tensor | None]:
    """delta_n = d l_n / d z_n of every tapped layer: row n of dL/dz for the summed loss
    L = sum_n l_n (None: the layer does not reach it). ``retain`` keeps the graph for another
    backward through it."""
    for tap in taps.values():
        tap.delta = None
    anchors = [sites[m].anchor for m in taps]
    torch.autograd.grad(losses.sum(), anchors, retain_graph=retain, allow_unused=True)
    return {m: tap.delta for m, tap in taps.items()}


# --------------------------------------------- per-sample gradients of any module (torch.func)


def generic_grads(
    model: nn.Module,
    names: list[str],
    x: Tensor,
    targets: Tensor,
    loss: LossFn,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> Iterator[tuple[slice, dict[str, Tensor]]]:
    """Per-sample gradients g_n = d loss(model(x_n), t_n) / d theta, {name: [n, *shape]} of the
    parameters ``names``, chunk by chunk: (the samples' slice, their gradients).

    torch.func: vmap over samples of grad of the single-sample loss; each chunk holds at most
    about ``buffer_bytes`` of gradients (at least one sample).
    """
    params = dict(model.named_parameters())
    wrt = {n: params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in params.items() if n not in wrt}

    def sample_loss(w: dict[str, Tensor], xn: Tensor, tn: Tensor) -> Tensor:
        out = functional_call(model, (w, fixed), (xn.unsqueeze(0),))
        return loss(out, tn.unsqueeze(0)).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    row_bytes = sum(t.numel() * t.element_size() for t in wrt.values())
    chunk = max(1, buffer_bytes // row_bytes)
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        yield part, per_sample(wrt, x[part], targets[part])
