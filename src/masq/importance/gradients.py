"""Per-sample gradients g_n = d l_n / d theta, two ways (notation of
:mod:`~masq.importance.persample`), or sums of functions of them: squares for
:func:`~masq.importance.fisher`, absolute values for :func:`~masq.importance.mas`.

- Closed form for ``nn.Linear`` (z = W a + b on a [B, in] input): g_n(W) = delta_n a_n^T and
  g_n(b) = delta_n with delta_n = d l_n / d z_n. One backward pass of the SUMMED loss sum_n l_n
  yields every delta_n unscaled (row n of dL/dz); hooks record a_n and delta_n
  (:func:`linear_sites`, :func:`tapped`, :class:`LinearTap`, :func:`linear_deltas`).
- Any other module: torch.func, vmap over the samples of grad of the single-sample loss
  (:func:`generic_grads`), in chunks of at most ``buffer_bytes`` of gradients.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from masq.importance.persample import DEFAULT_BUFFER_BYTES, LossFn

__all__ = [
    "LinearSite",
    "LinearTap",
    "generic_grads",
    "linear_deltas",
    "linear_sites",
    "paused",
    "tapped",
]


# ------------------------------------------------------ per-sample gradients of nn.Linear layers
#
# The closed form of the module docstring. A forward hook keeps a_n and registers a tensor hook
# on z that receives dL/dz; the hook is placed before any later in-place operation
# (ReLU(inplace=True)), so it sees the gradient of the layer's own output.
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
