"""Per-sample gradients, and the model handling shared by every measure of the package.

Notation: a batch of B samples x_n with labels y_n, per-sample losses l_n = loss(model(x_n), y_n)
and per-sample gradients g_n = d l_n / d theta.

Two ways to the g_n (or to the sums of their squares, which is all :func:`~masq.importance.fisher`
needs):

- Closed form for ``nn.Linear`` (z = W a + b on a [B, in] input): g_n(W) = delta_n a_n^T and
  g_n(b) = delta_n with delta_n = d l_n / d z_n. One backward pass of the SUMMED loss sum_n l_n
  yields every delta_n unscaled (row n of dL/dz); hooks record a_n and delta_n
  (:class:`_LinearTap`, :func:`_deltas`).
- Any other module: torch.func, vmap over the samples of grad of the single-sample loss
  (:func:`_generic_grads`), in chunks of bounded memory.

Everything here is internal to :mod:`masq.importance`; its public names are re-exported by the
package.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from masq.config import FisherLabels
from masq.errors import ConfigError

Importance = dict[str, Tensor]
"""Importance per trainable parameter, keyed and shaped like ``model.named_parameters()``."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(logits, y) -> per-sample losses`` of shape ``[B]`` (reduction "none")."""

# Bound on the temporaries of one chunk of samples (per-sample gradients, feature buffers). Every
# module of the package reads it here at call time, so that one setting governs them all.
_BUFFER_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- model handling


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with ``requires_grad``, by name; a ConfigError when there are none."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters; set requires_grad on some")
    return params


def _resolve(device: torch.device) -> torch.device:
    """``device`` with its index filled in ("cuda" -> "cuda:0"), as tensors report it."""
    return torch.empty(0, device=device).device


def _placement(model: nn.Module, device: torch.device | str | None) -> tuple[torch.device, bool]:
    """(the device to compute on, whether that needs a copy of the model).

    ``None`` means the device of the model's trainable parameters: no copy. Another device
    needs a copy of the model moved there.
    """
    home = next(iter(_trainable(model).values())).device
    if device is None:
        return home, False
    target = _resolve(torch.device(device))
    return target, target != _resolve(home)


@contextlib.contextmanager
def _evaluating(
    model: nn.Module, device: torch.device | str | None
) -> Iterator[tuple[nn.Module, torch.device]]:
    """Yield (the model to compute with, in eval mode, on ``device``; that device).

    On the model's own device that is the model itself, its train/eval flags restored on exit;
    on another device it is a copy moved there, and the caller's model is not touched at all.
    """
    target, moved = _placement(model, device)
    work = copy.deepcopy(model).to(target) if moved else model
    modes = [(m, m.training) for m in work.modules()]
    work.eval()
    try:
        yield work, target
    finally:
        for m, mode in modes:
            m.training = mode


def _finish(sums: dict[str, Tensor], count: int, model: nn.Module) -> Importance:
    """sums / count, each in the dtype and on the device of the model's parameter of that name."""
    if count == 0:
        raise ConfigError("batches yielded nothing; pass at least one (x, y) batch")
    params = _trainable(model)
    return {
        n: (s / count).to(dtype=params[n].dtype, device=params[n].device) for n, s in sums.items()
    }


def _per_sample_losses(loss: LossFn, logits: Tensor, targets: Tensor) -> Tensor:
    """l_n = loss(logits, targets), checked to hold one loss per sample (shape [B])."""
    losses = loss(logits, targets)
    if losses.shape != (logits.shape[0],):
        raise ConfigError(
            f"loss must return one loss per sample, shape ({logits.shape[0]},), got "
            f"{tuple(losses.shape)}; use reduction='none'"
        )
    return losses


# ------------------------------------------------------------------------------ input checks
#
# Once per batch, no loop over samples: shapes from metadata before the forward pass, then the
# values (finite inputs, labels in range) in two reductions and one host sync after it.


def _input_width(model: nn.Module) -> int | None:
    """``in_features`` of the first layer when ``model`` is an ``nn.Sequential`` (possibly
    nested) that starts with an ``nn.Linear``; None when the width cannot be read off."""
    first: nn.Module = model
    while isinstance(first, nn.Sequential) and len(first) > 0:
        first = first[0]
    return first.in_features if isinstance(first, nn.Linear) else None


def _check_batch(x: object, y: object, index: int, width: int | None, labels: bool) -> None:
    """A one-line ConfigError unless batch ``index`` is a pair of tensors of equal length,
    ``x`` has shape [B, ..., width] where the model's input ``width`` is known, and (``labels``: the
    class labels of the default cross-entropy) ``y`` is integer or soft labels [B, C]."""
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
    if width is not None and (x.ndim < 2 or x.shape[-1] != width):
        raise ConfigError(
            f"x: batch {index} has shape {tuple(x.shape)} but the model's first layer takes "
            f"[B, {width}]; pass inputs with {width} features (flattened images)"
        )
    if labels and (y.dtype == torch.bool or (y.is_floating_point() and y.ndim == 1)):
        raise ConfigError(
            f"y: batch {index} has labels of dtype {y.dtype}; class labels are integers (y.long())"
        )


def _check_values(x: Tensor, y: Tensor, logits: Tensor, index: int, labels: bool) -> None:
    """A one-line ConfigError when batch ``index`` holds NaN/inf inputs or (``labels``: the
    integer labels of a cross-entropy) a label outside 0..C-1, C = logits.shape[-1].

    Cheap: the sum of ``x`` is finite exactly when every entry is (barring an overflow of
    huge values, told apart on the error path only), so it takes one reduction of x, one of the
    labels and one host sync.
    """
    flags = [torch.isfinite(x.sum())] if x.is_floating_point() else []
    classes = logits.shape[-1] if logits.ndim >= 1 else 0
    if labels and not y.is_floating_point() and y.numel() > 0:
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


@dataclass(frozen=True)
class _LinearSite:
    """An nn.Linear whose trainable parameters no other module shares."""

    module: nn.Linear
    weight: str | None  # full parameter names, None where frozen or absent
    bias: str | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)

    @property
    def anchor(self) -> nn.Parameter:
        """The parameter whose gradient is requested so that backward runs through the layer.

        The bias is preferred: its gradient costs a column sum, the weight's a matrix product.
        """
        return self.module.bias if self.bias is not None else self.module.weight


def _linear_sites(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, _LinearSite]:
    """The nn.Linear modules (by module name) eligible for the closed form."""
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
        weight = f"{prefix}weight" if f"{prefix}weight" in trainable else None
        bias = f"{prefix}bias" if f"{prefix}bias" in trainable else None
        if weight or bias:
            sites[mname] = _LinearSite(m, weight, bias)
    return sites


class _LinearTap:
    """Records the input a and the output gradient delta of one nn.Linear during a batch."""

    def __init__(self, module: nn.Linear) -> None:
        self.enabled = True
        self.calls = 0
        self.input: Tensor | None = None
        self.delta: Tensor | None = None
        self._handle = module.register_forward_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
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
        self.calls, self.input, self.delta = 0, None, None

    def clean(self, batch_size: int) -> bool:
        """Whether the closed form holds: called once, on a [batch_size, in] input."""
        a = self.input
        return self.calls == 1 and a is not None and a.ndim == 2 and a.shape[0] == batch_size

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def _paused(taps: dict[str, _LinearTap]) -> Iterator[None]:
    """Switch the taps off (for the torch.func forward passes)."""
    for tap in taps.values():
        tap.enabled = False
    try:
        yield
    finally:
        for tap in taps.values():
            tap.enabled = True


@contextlib.contextmanager
def _tapped(sites: dict[str, _LinearSite]) -> Iterator[dict[str, _LinearTap]]:
    """A tap on every site, by module name; the hooks are removed on exit."""
    taps = {name: _LinearTap(site.module) for name, site in sites.items()}
    try:
        yield taps
    finally:
        for tap in taps.values():
            tap.remove()


def _deltas(
    losses: Tensor, taps: dict[str, _LinearTap], sites: dict[str, _LinearSite], retain: bool
) -> dict[str, Tensor | None]:
    """delta_n of every tapped layer for the summed loss (None: the layer does not reach it)."""
    for tap in taps.values():
        tap.delta = None
    anchors = [sites[m].anchor for m in taps]
    torch.autograd.grad(losses.sum(), anchors, retain_graph=retain, allow_unused=True)
    return {m: tap.delta for m, tap in taps.items()}


# --------------------------------------------- per-sample gradients of any module (torch.func)


def _generic_grads(
    model: nn.Module, names: list[str], x: Tensor, targets: Tensor, loss: LossFn
) -> Iterator[tuple[slice, dict[str, Tensor]]]:
    """Per-sample gradients {name: [n, *shape]} of the parameters ``names``, chunk by chunk.

    torch.func: vmap over samples of grad of the single-sample loss; each chunk holds at most
    about _BUFFER_BYTES of gradients.
    """
    params = dict(model.named_parameters())
    wrt = {n: params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in params.items() if n not in wrt}

    def sample_loss(w: dict[str, Tensor], xn: Tensor, tn: Tensor) -> Tensor:
        out = functional_call(model, (w, fixed), (xn.unsqueeze(0),))
        return loss(out, tn.unsqueeze(0)).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    row_bytes = sum(t.numel() * t.element_size() for t in wrt.values())
    chunk = max(1, _BUFFER_BYTES // row_bytes)
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        yield part, per_sample(wrt, x[part], targets[part])


# ------------------------------------------------------------------------------- label terms


def _label_terms(
    logits: Tensor, y: Tensor, labels: FisherLabels, generator: torch.Generator | None
) -> list[tuple[Tensor, Tensor | None]]:
    """The (targets, per-sample weight w_n or None for 1) pairs whose sum_n w_n g_n^2 are summed.

    true: [(y, 1)]; sampled: [(y~ drawn from softmax(logits), 1)]; exact: [(c, p_c) for every
    class c], p = softmax(logits) taken as constant.
    """
    if labels is FisherLabels.TRUE:
        return [(y, None)]
    if logits.ndim != 2:
        raise ConfigError(
            f"labels={labels.value!r} needs logits of shape [B, classes], got "
            f"{tuple(logits.shape)}; use labels='true'"
        )
    probs = torch.softmax(logits.detach(), dim=1)
    if labels is FisherLabels.SAMPLED:
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
