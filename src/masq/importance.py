"""Parameter importance: the diagonal empirical Fisher, MaSQ, and full Fisher-block statistics.

Notation (PAPER.md section 4): a pass over N samples x_n with labels y_n, split into K
batches b; the per-sample loss is l_n = loss(model(x_n), y_n) and the per-sample gradient
is g_n = d l_n / d theta.

- :func:`fisher` (per-sample squares, then the mean): F_k = (1/N) sum_n g_nk^2
- :func:`masq` (batch means, then squares): F_k = (1/K) sum_b ((1/|b|) sum_{n in b} g_nk)^2
- :func:`fisher_block_stats`: statistics of the full block F_ij = (1/N) sum_n g_ni g_nj of one
  parameter tensor.

Quickstart, from any training loop::

    from masq import importance

    data = importance.batches(x_train, y_train, batch_size=1000)
    imp = importance.fisher(model, data)            # or importance.masq(model, data)
    imp["0.weight"]                                 # shaped like model[0].weight

Contract shared by every function here:

- ``batches`` is any iterable of ``(x, y)`` pairs; it is iterated exactly once.
- ``loss(logits, y)`` returns one loss per sample (shape ``[B]``, i.e. ``reduction="none"``);
  the default is :func:`cross_entropy` on logits. Losses are combined here: summed for
  per-sample gradients (so no 1/B factor enters them), averaged for MaSQ's batch gradients.
- The importance is computed with the model in eval mode (dropout off, batch norm on its running
  statistics) so that samples are independent; the model is handed back exactly as it was found:
  weights, ``.grad`` (None or not), train/eval flags and ``requires_grad`` flags are untouched.
- ``device=None`` computes on the model's device. Another device computes on a copy of the model
  moved there; the results always come back on the device and in the dtype of each parameter.
- The result maps the name of every trainable parameter (``requires_grad``) to a tensor of its
  shape. Sums are accumulated in float64.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from masq.errors import ConfigError

__all__ = [
    "MEASURES",
    "BlockStats",
    "Importance",
    "Labels",
    "LossFn",
    "Scale",
    "batches",
    "cross_entropy",
    "fisher",
    "fisher_block_stats",
    "masq",
    "summary",
]

Importance = dict[str, Tensor]
"""Importance per trainable parameter, keyed and shaped like ``model.named_parameters()``."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(logits, y) -> per-sample losses`` of shape ``[B]`` (reduction "none")."""

# Bound on the temporaries of one chunk of samples (per-sample gradients, feature buffers).
_BUFFER_BYTES = 64 * 2**20
# Temporaries allocated anew in a loop stay below this: the allocator (glibc) then recycles
# them, while larger ones are fresh pages whose first touch costs more than the arithmetic.
_SMALL_BYTES = 16 * 2**20
# A dense Fisher block is accumulated in float64 up to this size, above it in float32.
_DENSE_FLOAT64_BYTES = 3 * 2**30

_E = TypeVar("_E", bound=Enum)


class Labels(str, Enum):
    """Where the labels of the per-sample gradients in :func:`fisher` come from."""

    TRUE = "true"  # the data's labels: the empirical Fisher of the paper
    SAMPLED = "sampled"  # one label per sample drawn from the model's softmax
    EXACT = "exact"  # every class c, weighted by the softmax probability p_c(x_n)


class Scale(str, Enum):
    """Scale convention of :func:`masq`."""

    MEAN = "mean"  # the paper: squared gradient of the batch-MEAN loss
    SUM = "sum"  # the authors' group code: squared gradient of the SUMMED loss / batch size


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy l_n = -log softmax(logits_n)[y_n] (reduction "none")."""
    return nn.functional.cross_entropy(logits, y, reduction="none")


def batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``(x, y)`` in order, in batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} samples but y has {len(y)}; pass matching tensors")

    def generate() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]

    return generate()


def summary(imp: Importance) -> dict[str, dict[str, float]]:
    """Per tensor: the maximum, mean and sum of its importance values."""
    return {
        name: {
            "max": float(t.max()),
            "mean": float(t.double().mean()),
            "sum": float(t.double().sum()),
        }
        for name, t in imp.items()
    }


def _choice(kind: type[_E], value: object, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        options = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"unknown {what} {value!r}; choose one of {options}") from None


# --------------------------------------------------------------------------- model handling


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters; set requires_grad on some")
    return params


def _resolve(device: torch.device) -> torch.device:
    return torch.empty(0, device=device).device


@contextlib.contextmanager
def _evaluating(
    model: nn.Module, device: torch.device | str | None
) -> Iterator[tuple[nn.Module, torch.device]]:
    """Yield (the model to compute with, in eval mode, on ``device``; that device).

    On the model's own device that is the model itself, its train/eval flags restored on exit;
    on another device it is a moved copy.
    """
    home = next(iter(_trainable(model).values())).device
    target = home if device is None else _resolve(torch.device(device))
    work = model if target == _resolve(home) else copy.deepcopy(model).to(target)
    modes = [(m, m.training) for m in work.modules()]
    work.eval()
    try:
        yield work, target
    finally:
        for m, mode in modes:
            m.training = mode


def _finish(sums: dict[str, Tensor], count: int, model: nn.Module) -> Importance:
    """Divide the float64 sums by ``count``; return them in each parameter's dtype and device."""
    if count == 0:
        raise ConfigError("batches yielded nothing; pass at least one (x, y) batch")
    params = _trainable(model)
    return {
        n: (s / count).to(dtype=params[n].dtype, device=params[n].device) for n, s in sums.items()
    }


def _per_sample_losses(loss: LossFn, logits: Tensor, targets: Tensor) -> Tensor:
    losses = loss(logits, targets)
    if losses.shape != (logits.shape[0],):
        raise ConfigError(
            f"loss must return one loss per sample, shape ({logits.shape[0]},), got "
            f"{tuple(losses.shape)}; use reduction='none'"
        )
    return losses


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


# --------------------------------------------------------------------------------- fisher


def _label_terms(
    logits: Tensor, y: Tensor, labels: Labels, generator: torch.Generator | None
) -> list[tuple[Tensor, Tensor | None]]:
    """The (targets, per-sample weight or None) pairs whose weighted g^2 are summed."""
    if labels is Labels.TRUE:
        return [(y, None)]
    if logits.ndim != 2:
        raise ConfigError(
            f"labels={labels.value!r} needs logits of shape [B, classes], got "
            f"{tuple(logits.shape)}; use labels='true'"
        )
    probs = torch.softmax(logits.detach(), dim=1)
    if labels is Labels.SAMPLED:
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


def _fisher_batch(
    model: nn.Module,
    sites: dict[str, _LinearSite],
    taps: dict[str, _LinearTap],
    batch: tuple[Tensor, Tensor],
    labels: Labels,
    generator: torch.Generator | None,
    loss: LossFn,
    sums: dict[str, Tensor],
) -> None:
    """Add sum_{n in batch} (weighted) g_n^2 of every trainable parameter to ``sums``."""
    x, y = batch
    for tap in taps.values():
        tap.reset()
    logits = model(x)
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
    labels: Labels | str = "true",
    generator: torch.Generator | None = None,
    loss: LossFn = cross_entropy,
    device: torch.device | str | None = None,
) -> Importance:
    """The diagonal Fisher F_k = (1/N) sum_n g_nk^2 from exact per-sample gradients.

    g_n is the gradient of sample n's own loss l_n (no 1/B factor), so the result does not depend
    on how the N samples are split into batches (for ``labels="sampled"`` the draws do).

    ``labels``:
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
    """
    mode = _choice(Labels, labels, "labels")
    if mode is Labels.SAMPLED and generator is None:
        raise ConfigError(
            "labels='sampled' needs generator=torch.Generator().manual_seed(SEED) for the draws"
        )
    with _evaluating(model, device) as (work, dev):
        params = _trainable(work)
        sites = _linear_sites(work, params)
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
        count = 0
        with _tapped(sites) as taps:
            for x, y in batches:
                batch = (x.to(dev), y.to(dev))
                _fisher_batch(work, sites, taps, batch, mode, generator, loss, sums)
                count += len(x)
    return _finish(sums, count, model)


# ----------------------------------------------------------------------------------- masq


def masq(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    scale: Scale | str = "mean",
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

    One forward and one ordinary backward per batch; ``.grad`` is not touched.
    """
    mode = _choice(Scale, scale, "scale")
    with _evaluating(model, device) as (work, dev):
        params = _trainable(work)
        sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
        count = 0
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)
            losses = _per_sample_losses(loss, work(x), y)
            grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
            factor = len(x) if mode is Scale.SUM else 1
            for n, g in zip(params, grads, strict=True):
                if g is not None:
                    sums[n].add_(g.square(), alpha=factor)
            count += 1
    return _finish(sums, count, model)


MEASURES: dict[str, Callable[..., Importance]] = {"fisher": fisher, "masq": masq}
"""The importance measures by name: ``MEASURES[name](model, batches, ...)``."""


# ------------------------------------------------------------------------ Fisher-block stats


@dataclass(frozen=True)
class BlockStats:
    """Statistics of the full empirical Fisher block F_ij = (1/N) sum_n g_ni g_nj of one tensor.

    i, j run over the tensor's P parameters (flattened in row-major order). The diagonal
    (P entries) and off-diagonal (P^2 - P entries) sums and means are always exact. The sums of
    absolute off-diagonal values are exact when ``estimated`` is False; otherwise they are
    estimated from ``sampled_entries`` uniformly drawn off-diagonal entries, with a CLT confidence
    interval at level ``confidence`` (the interval fields are None when exact). Means over zero
    entries (P = 1) are NaN.
    """

    name: str
    num_params: int
    num_samples: int
    diag_count: int
    offdiag_count: int
    diag_sum: float
    diag_mean: float
    offdiag_sum: float
    offdiag_mean: float
    offdiag_abs_sum: float
    offdiag_abs_mean: float
    estimated: bool
    sampled_entries: int | None = None
    confidence: float | None = None
    offdiag_abs_sum_ci: tuple[float, float] | None = None
    offdiag_abs_mean_ci: tuple[float, float] | None = None


@dataclass(frozen=True)
class _Rows:
    """Per-sample gradients of one tensor for n samples: dense [n, P], or the Kronecker factors
    delta [n, O] and a [n, I] of a linear layer, with row n = vec(delta_n a_n^T) (row-major)."""

    dense: Tensor | None = None
    delta: Tensor | None = None
    act: Tensor | None = None

    def sums(self) -> Tensor:
        """sum_i g_ni per sample."""
        if self.dense is not None:
            return self.dense.sum(1)
        return self.delta.sum(1) * self.act.sum(1)

    def square_sums(self) -> Tensor:
        """sum_i g_ni^2 per sample."""
        if self.dense is not None:
            return self.dense.square().sum(1)
        return self.delta.square().sum(1) * self.act.square().sum(1)

    def columns(self, idx: Tensor) -> Tensor:
        """g_n[idx] for every sample: [n, len(idx)]."""
        if self.dense is not None:
            return self.dense[:, idx]
        width = self.act.shape[1]
        return self.delta[:, idx // width] * self.act[:, idx % width]


def _off_diag_abs_dense(block: Tensor) -> float:
    """sum_{i != j} |block_ij|, reduced in float64 row block by row block."""
    block.fill_diagonal_(0)
    step = max(1, _BUFFER_BYTES // (8 * block.shape[1]))
    return sum(
        float(block[r : r + step].abs().sum(dtype=torch.float64))
        for r in range(0, len(block), step)
    )


class _DenseBlock:
    """Exact: accumulates sum_n g_n g_n^T (P x P), float64 when it fits _DENSE_FLOAT64_BYTES.

    Above that float32 (P = 25,000: 2.5 GB): each chunk's product and the running sum carry a
    relative rounding error of order (chunks) x 6e-8, far below the precision the statistics
    are reported with; the reductions are done in float64.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        wide = size * size * 8 <= _DENSE_FLOAT64_BYTES
        self.matrix = torch.zeros(
            size, size, dtype=torch.float64 if wide else torch.float32, device=device
        )

    def add(self, rows: _Rows) -> None:
        g = (
            rows.dense
            if rows.dense is not None
            else rows.columns(torch.arange(self.matrix.shape[0], device=self.matrix.device))
        )
        g = g.to(self.matrix.dtype)
        self.matrix.addmm_(g.T, g)

    def off_diag_abs_sum(self) -> float:
        return _off_diag_abs_dense(self.matrix)


class _KronBlock:
    """Exact for a linear layer's weight (or bias, a = 1): uses F's Kronecker symmetry.

    F[(o,i),(o',i')] = (1/N) sum_n (delta_no delta_no') (a_ni a_ni'), so with the pair features
    p_n = (delta_no delta_no')_{o<=o'} and q_n = (a_ni a_ni')_{i<=i'} the matrix
    M = sum_n q_n p_n^T holds every distinct entry of N F once: about P^2/4 entries and a quarter
    of the work of sum_n g_n g_n^T. Entry ((i,i'),(o,o')) stands for (1 + [i<i'])(1 + [o<o'])
    entries of F. The factor with more pairs ("wide", here a) indexes the rows of M, the other
    ("narrow") its columns.

    Rows are gathered into products of _ROWS samples, whatever the batch size; the wide features
    are built block by block in reused buffers. Each product is computed in the model's dtype
    (float32: its rounding is of the order of that of the float32 gradients themselves) and
    added to M in float64.
    """

    _ROWS = 1024

    def __init__(
        self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        out_pairs = torch.triu_indices(out_features, out_features, device=device)
        in_pairs = torch.triu_indices(in_features, in_features, device=device)
        self.wide_is_out = out_pairs.shape[1] > in_pairs.shape[1]
        self.wide, self.narrow = (
            (out_pairs, in_pairs) if self.wide_is_out else (in_pairs, out_pairs)
        )
        n_wide, n_narrow = self.wide.shape[1], self.narrow.shape[1]
        self.matrix = torch.zeros(n_wide, n_narrow, dtype=torch.float64, device=device)
        item = torch.empty((), dtype=dtype).element_size()
        self.block = max(1, min(n_wide, _BUFFER_BYTES // (self._ROWS * item)))
        self.block = max(1, min(self.block, _BUFFER_BYTES // (n_narrow * item)))
        size = max(self._ROWS * self.block, self.block * n_narrow)
        self.buffers = torch.empty(3, size, dtype=dtype, device=device)
        self.pending: list[tuple[Tensor, Tensor]] = []

    def add(self, rows: _Rows) -> None:
        if rows.delta is None:
            raise ConfigError(
                "the layer was not a plain once-per-forward linear layer in every batch; "
                "keep the model's forward the same for all batches"
            )
        self.pending.append((rows.delta, rows.act))
        if sum(len(d) for d, _ in self.pending) >= self._ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        dtype = self.buffers.dtype
        delta = torch.cat([d for d, _ in self.pending]).to(dtype)
        act = torch.cat([a for _, a in self.pending]).to(dtype)
        self.pending = []
        wide, narrow = (delta, act) if self.wide_is_out else (act, delta)
        for s in range(0, len(delta), self._ROWS):
            self._accumulate(wide[s : s + self._ROWS], narrow[s : s + self._ROWS])

    def _accumulate(self, wide: Tensor, narrow: Tensor) -> None:
        """M += sum over these k samples of (wide pair features)(narrow pair features)^T."""
        k = len(wide)
        u = narrow[:, self.narrow[0]] * narrow[:, self.narrow[1]]
        first, second, product = self.buffers
        for c in range(0, self.matrix.shape[0], self.block):
            i0, i1 = self.wide[0, c : c + self.block], self.wide[1, c : c + self.block]
            w = len(i0)
            v = torch.index_select(wide, 1, i0, out=first[: k * w].view(k, w))
            v.mul_(torch.index_select(wide, 1, i1, out=second[: k * w].view(k, w)))
            out = product[: w * u.shape[1]].view(w, u.shape[1])
            self.matrix[c : c + w] += torch.mm(v.T, u, out=out)

    def off_diag_abs_sum(self) -> float:
        self._flush()
        (w0, w1), (n0, n1) = self.wide, self.narrow
        weight_wide, weight_narrow = 1.0 + (w0 < w1).double(), 1.0 + (n0 < n1).double()
        m = self.matrix
        m[(w0 == w1).nonzero()[:, :1], (n0 == n1).nonzero()[:, 0]] = 0.0  # drop F's diagonal
        step = max(1, _BUFFER_BYTES // (8 * m.shape[1]))
        return sum(
            float(m[r : r + step].abs() @ weight_narrow @ weight_wide[r : r + step])
            for r in range(0, len(m), step)
        )


class _SampledBlock:
    """Estimate: sum_n g_ni g_nj for S off-diagonal (i, j) drawn uniformly with replacement."""

    def __init__(
        self, size: int, samples: int, generator: torch.Generator, device: torch.device
    ) -> None:
        i = torch.randint(size, (samples,), generator=generator, device=generator.device)
        j = torch.randint(size - 1, (samples,), generator=generator, device=generator.device)
        j = j + (j >= i)
        self.i, self.j = i.to(device), j.to(device)
        self.sums = torch.zeros(samples, dtype=torch.float64, device=device)

    def add(self, rows: _Rows) -> None:
        n = len(rows.dense if rows.dense is not None else rows.delta)
        step = max(1, _SMALL_BYTES // (8 * n))
        for s in range(0, len(self.i), step):
            gi = rows.columns(self.i[s : s + step]).double()
            gj = rows.columns(self.j[s : s + step]).double()
            self.sums[s : s + step] += (gi * gj).sum(0)


def _rows_of_batch(
    model: nn.Module,
    name: str,
    site: tuple[str, _LinearSite] | None,
    taps: dict[str, _LinearTap],
    batch: tuple[Tensor, Tensor],
    loss: LossFn,
) -> Iterator[_Rows]:
    """Per-sample gradients of the tensor ``name`` over one batch (true labels)."""
    x, y = batch
    if site is not None:
        mname, linear = site
        tap = taps[mname]
        tap.reset()
        losses = _per_sample_losses(loss, model(x), y)
        if tap.clean(len(x)):
            delta = _deltas(losses, taps, {mname: linear}, retain=False)[mname]
            if delta is None:
                delta = torch.zeros(
                    len(x), linear.module.out_features, dtype=losses.dtype, device=x.device
                )
            assert tap.input is not None
            act = tap.input if name == linear.weight else torch.ones_like(delta[:, :1])
            yield _Rows(delta=delta.detach(), act=act)
            return
    with _paused(taps):
        for _, g in _generic_grads(model, [name], x, y, loss):
            yield _Rows(dense=g[name].flatten(1))


def fisher_block_stats(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    name: str,
    *,
    max_exact_params: int = 25_000,
    samples: int = 100_000,
    generator: torch.Generator | None = None,
    confidence: float = 0.95,
    loss: LossFn = cross_entropy,
    device: torch.device | str | None = None,
) -> BlockStats:
    """Statistics of the full empirical Fisher block F_ij = (1/N) sum_n g_ni g_nj of ``name``.

    Exact without the per-sample matrix: diag sum = (1/N) sum_n |g_n|^2 (the sum of
    :func:`fisher` with true labels); total sum = (1/N) sum_n (sum_i g_ni)^2; off-diagonal
    sum = total - diag. The absolute off-diagonal values need the entries themselves:

    - P <= ``max_exact_params``: exact. A linear layer's weight or bias accumulates the
      distinct entries of N F from Kronecker features (a quarter of the P^2 entries, float64;
      784 x 30 weights: 1.1 GB); any other tensor accumulates sum_n g_n g_n^T (P x P) from
      per-sample gradient chunks. Cost: about N P^2 / 4 resp. N P^2 multiply-adds.
    - Larger: ``samples`` off-diagonal entries (i, j) drawn uniformly (with replacement, from
      ``generator``; None means torch.Generator().manual_seed(0)); the mean of their |F_ij| is an
      unbiased estimate of the off-diagonal absolute mean, with the normal (CLT) interval
      mean +- z * sd / sqrt(samples) at level ``confidence``; ``estimated=True``.

    Labels are the data's (the paper's empirical Fisher). One pass over ``batches``.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if samples < 2:
        raise ConfigError(f"samples must be at least 2 for an interval, got {samples}")
    if max_exact_params < 0:
        raise ConfigError(f"max_exact_params must be non-negative, got {max_exact_params}")
    with _evaluating(model, device) as (work, dev):
        params = _trainable(work)
        if name not in params:
            raise ConfigError(f"unknown parameter {name!r}; valid names: {', '.join(params)}")
        size = params[name].numel()
        estimated = size > max(max_exact_params, 1)
        site = next(
            ((m, s) for m, s in _linear_sites(work, params).items() if name in s.names), None
        )
        block: _DenseBlock | _KronBlock | _SampledBlock | None = None
        diag = total = torch.zeros((), dtype=torch.float64, device=dev)
        count = 0
        with _tapped(dict([site]) if site else {}) as taps:
            for x, y in batches:
                for rows in _rows_of_batch(work, name, site, taps, (x.to(dev), y.to(dev)), loss):
                    if block is None:
                        block = _new_block(rows, size, estimated, samples, generator, dev)
                    block.add(rows)
                    diag = diag + rows.square_sums().double().sum()
                    total = total + rows.sums().double().square().sum()
                count += len(x)
    if count == 0:
        raise ConfigError("batches yielded nothing; pass at least one (x, y) batch")
    assert block is not None
    return _block_stats(name, size, count, float(diag), float(total), block, confidence)


def _new_block(
    rows: _Rows,
    size: int,
    estimated: bool,
    samples: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> _DenseBlock | _KronBlock | _SampledBlock:
    if estimated:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return _SampledBlock(size, samples, gen, device)
    if rows.delta is not None:
        return _KronBlock(rows.delta.shape[1], rows.act.shape[1], rows.delta.dtype, device)
    return _DenseBlock(size, device)


def _block_stats(
    name: str,
    size: int,
    count: int,
    diag: float,
    total: float,
    block: _DenseBlock | _KronBlock | _SampledBlock,
    confidence: float,
) -> BlockStats:
    off_count = size * size - size

    def mean(s: float, k: int) -> float:
        return s / k if k else math.nan

    common = {
        "name": name,
        "num_params": size,
        "num_samples": count,
        "diag_count": size,
        "offdiag_count": off_count,
        "diag_sum": diag / count,
        "diag_mean": diag / count / size,
        "offdiag_sum": (total - diag) / count,
        "offdiag_mean": mean((total - diag) / count, off_count),
    }
    if not isinstance(block, _SampledBlock):
        abs_sum = block.off_diag_abs_sum() / count
        return BlockStats(
            **common,
            offdiag_abs_sum=abs_sum,
            offdiag_abs_mean=mean(abs_sum, off_count),
            estimated=False,
        )
    values = (block.sums / count).abs()
    m, sd = float(values.mean()), float(values.std())
    half = statistics.NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(len(values))
    low, high = max(0.0, m - half), m + half
    return BlockStats(
        **common,
        offdiag_abs_sum=m * off_count,
        offdiag_abs_mean=m,
        estimated=True,
        sampled_entries=len(values),
        confidence=confidence,
        offdiag_abs_sum_ci=(low * off_count, high * off_count),
        offdiag_abs_mean_ci=(low, high),
    )
