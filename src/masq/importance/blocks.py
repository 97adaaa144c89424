"""The full empirical Fisher block of one parameter tensor: built whole, or its statistics.

For a tensor with P parameters and per-sample gradients g_n (N samples, labels from the data),
the block is F_ij = (1/N) sum_n g_ni g_nj (i, j in 1..P); its diagonal is the
:func:`~masq.importance.fisher` of that tensor. :func:`fisher_block` builds F (P x P, for heat
maps and tests); :func:`fisher_block_stats` reports the sums and means of its diagonal, its
off-diagonal part and the absolute values of the latter, without ever holding the N x P
per-sample matrix (nor, for a linear layer's tensors, F itself). Both take the per-sample
gradients from :mod:`~masq.importance.gradients`; this module is the package's one builder of
Fisher blocks (:mod:`masq.analysis.diagonality` calls it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from masq.errors import ConfigError
from masq.importance.diagonal import cross_entropy
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
    LossFn,
    check_buffer_bytes,
    evaluating,
    per_sample_losses,
    trainable_params,
)

# Temporaries allocated anew in a loop stay below this: the allocator (glibc) then recycles
# them, while larger ones are fresh pages whose first touch costs more than the arithmetic.
# (The bound on a chunk's temporaries is the buffer_bytes= of the public functions; this one is
# the smaller of the two.)
_SMALL_BYTES = 16 * 2**20
# A dense Fisher block is accumulated in float64 up to this size, above it in float32.
_DENSE_FLOAT64_BYTES = 3 * 2**30


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

    def factors(self) -> tuple[Tensor, Tensor]:
        """(delta, act) of rows built from the Kronecker factors (``dense`` is None)."""
        assert self.delta is not None and self.act is not None
        return self.delta, self.act

    def sums(self) -> Tensor:
        """sum_i g_ni per sample."""
        if self.dense is not None:
            return self.dense.sum(1)
        delta, act = self.factors()
        return delta.sum(1) * act.sum(1)

    def square_sums(self) -> Tensor:
        """sum_i g_ni^2 per sample."""
        if self.dense is not None:
            return self.dense.square().sum(1)
        delta, act = self.factors()
        return delta.square().sum(1) * act.square().sum(1)

    def columns(self, idx: Tensor) -> Tensor:
        """g_n[idx] for every sample: [n, len(idx)]."""
        if self.dense is not None:
            return self.dense[:, idx]
        delta, act = self.factors()
        width = act.shape[1]
        return delta[:, idx // width] * act[:, idx % width]


def _off_diag_abs_dense(block: Tensor, buffer_bytes: int) -> float:
    """sum_{i != j} |block_ij|, reduced in float64 row block by row block (of ``buffer_bytes``)."""
    block.fill_diagonal_(0)
    step = max(1, buffer_bytes // (8 * block.shape[1]))
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

    def __init__(self, size: int, device: torch.device, buffer_bytes: int) -> None:
        self.buffer_bytes = buffer_bytes
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
        return _off_diag_abs_dense(self.matrix, self.buffer_bytes)


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
        self,
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        device: torch.device,
        buffer_bytes: int,
    ) -> None:
        self.buffer_bytes = buffer_bytes
        out_pairs = torch.triu_indices(out_features, out_features, device=device)
        in_pairs = torch.triu_indices(in_features, in_features, device=device)
        self.wide_is_out = out_pairs.shape[1] > in_pairs.shape[1]
        self.wide, self.narrow = (
            (out_pairs, in_pairs) if self.wide_is_out else (in_pairs, out_pairs)
        )
        n_wide, n_narrow = self.wide.shape[1], self.narrow.shape[1]
        self.matrix = torch.zeros(n_wide, n_narrow, dtype=torch.float64, device=device)
        item = torch.empty((), dtype=dtype).element_size()
        self.block = max(1, min(n_wide, buffer_bytes // (self._ROWS * item)))
        self.block = max(1, min(self.block, buffer_bytes // (n_narrow * item)))
        size = max(self._ROWS * self.block, self.block * n_narrow)
        self.buffers = torch.empty(3, size, dtype=dtype, device=device)
        self.pending: list[tuple[Tensor, Tensor]] = []

    def add(self, rows: _Rows) -> None:
        if rows.delta is None:
            raise ConfigError(
                "the layer was not a plain once-per-forward linear layer in every batch; "
                "keep the model's forward the same for all batches"
            )
        self.pending.append(rows.factors())
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
        step = max(1, self.buffer_bytes // (8 * m.shape[1]))
        return sum(
            float(m[r : r + step].abs() @ weight_narrow @ weight_wide[r : r + step])
            for r in range(0, len(m), step)
        )


class _SampledBlock:
    """Estimate: sum_n g_ni g_nj for S off-diagonal (i, j) drawn uniformly with replacement."""

    def __init__(
        self,
        size: int,
        samples: int,
        generator: torch.Generator,
        device: torch.device,
        buffer_bytes: int,
    ) -> None:
        self.small_bytes = min(_SMALL_BYTES, buffer_bytes)
        i = torch.randint(size, (samples,), generator=generator, device=generator.device)
        j = torch.randint(size - 1, (samples,), generator=generator, device=generator.device)
        j = j + (j >= i)
        self.i, self.j = i.to(device), j.to(device)
        self.sums = torch.zeros(samples, dtype=torch.float64, device=device)

    def add(self, rows: _Rows) -> None:
        n = len(rows.dense if rows.dense is not None else rows.factors()[0])
        step = max(1, self.small_bytes // (8 * n))
        for s in range(0, len(self.i), step):
            gi = rows.columns(self.i[s : s + step]).double()
            gj = rows.columns(self.j[s : s + step]).double()
            self.sums[s : s + step] += (gi * gj).sum(0)


def _rows_of_batch(
    model: nn.Module,
    name: str,
    site: tuple[str, LinearSite] | None,
    taps: dict[str, LinearTap],
    batch: tuple[Tensor, Tensor],
    loss: LossFn,
    buffer_bytes: int,
) -> Iterator[_Rows]:
    """Per-sample gradients of the tensor ``name`` over one batch (true labels): the Kronecker
    factors of a clean linear layer, else dense chunks of at most ``buffer_bytes``."""
    x, y = batch
    if site is not None:
        mname, linear = site
        tap = taps[mname]
        tap.reset()
        losses = per_sample_losses(loss, model(x), y)
        if tap.clean(len(x)):
            delta = linear_deltas(losses, taps, {mname: linear}, retain=False)[mname]
            if delta is None:
                delta = torch.zeros(
                    len(x), linear.module.out_features, dtype=losses.dtype, device=x.device
                )
            assert tap.input is not None
            act = tap.input if name == linear.weight else torch.ones_like(delta[:, :1])
            yield _Rows(delta=delta.detach(), act=act)
            return
    with paused(taps):
        for _, g in generic_grads(model, [name], x, y, loss, buffer_bytes=buffer_bytes):
            yield _Rows(dense=g[name].flatten(1))


def _site_of(
    model: nn.Module, params: dict[str, nn.Parameter], name: str
) -> tuple[str, LinearSite] | None:
    """(module name, site) of the linear layer that owns tensor ``name`` (None: not one); a
    one-line ConfigError listing the valid names when ``name`` is no trainable tensor."""
    if name not in params:
        raise ConfigError(f"unknown parameter {name!r}; valid names: {', '.join(params)}")
    return next(((m, s) for m, s in linear_sites(model, params).items() if name in s.names), None)


def fisher_block(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    name: str,
    *,
    loss: LossFn = cross_entropy,
    device: torch.device | str | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> Tensor:
    """The whole empirical Fisher block F = (1/N) sum_n g_n g_n^T of the tensor ``name``.

    g_n = d loss(model(x_n), y_n) / d theta over that tensor's P entries (row-major order; the
    data's labels), so F is P x P and its diagonal is :func:`~masq.importance.fisher` of that
    tensor. It is accumulated as sum_n g_n g_n^T from per-sample gradients in chunks (the closed
    form g_n = vec(delta_n a_n^T) of a linear layer, torch.func for any other tensor; chunks of
    at most ``buffer_bytes``), in float64 when P^2 float64 entries fit 3 GiB (P <= 20,066), in
    float32 above. Memory: the P x P block (P = 4096: 128 MiB). The model is handled as by every
    measure (eval mode, handed back untouched; ``device``); the block comes back on the device
    of the parameter. Statistics of larger blocks without building them:
    :func:`fisher_block_stats`.
    """
    check_buffer_bytes(buffer_bytes)
    with evaluating(model, device) as (work, dev):
        params = trainable_params(work)
        site = _site_of(work, params, name)
        block = _DenseBlock(params[name].numel(), dev, buffer_bytes)
        count = 0
        with tapped(dict([site]) if site else {}) as taps:
            for x, y in batches:
                batch = (x.to(dev), y.to(dev))
                for rows in _rows_of_batch(work, name, site, taps, batch, loss, buffer_bytes):
                    block.add(rows)
                count += len(x)
    if count == 0:
        raise ConfigError("batches yielded nothing; pass at least one (x, y) batch")
    return (block.matrix / count).to(trainable_params(model)[name].device)


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
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> BlockStats:
    """Statistics of the full empirical Fisher block F_ij = (1/N) sum_n g_ni g_nj of ``name``.

    Exact without the per-sample matrix: diag sum = (1/N) sum_n |g_n|^2 (the sum of
    :func:`~masq.importance.fisher` with true labels); total sum = (1/N) sum_n (sum_i g_ni)^2;
    off-diagonal sum = total - diag. The absolute off-diagonal values need the entries themselves:

    - P <= ``max_exact_params``: exact. A linear layer's weight or bias accumulates the
      distinct entries of N F from Kronecker features (a quarter of the P^2 entries, float64;
      784 x 30 weights: 1.1 GB); any other tensor accumulates sum_n g_n g_n^T (P x P) from
      per-sample gradient chunks. Cost: about N P^2 / 4 resp. N P^2 multiply-adds.
    - Larger: ``samples`` off-diagonal entries (i, j) drawn uniformly (with replacement, from
      ``generator``; None means torch.Generator().manual_seed(0)); the mean of their |F_ij| is an
      unbiased estimate of the off-diagonal absolute mean, with the normal (CLT) interval
      mean +- z * sd / sqrt(samples) at level ``confidence``; ``estimated=True``.

    Labels are the data's (the paper's empirical Fisher). One pass over ``batches``.
    ``buffer_bytes`` bounds the temporaries of a chunk of samples (memory, not the result).
    The whole block itself: :func:`fisher_block`.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if samples < 2:
        raise ConfigError(f"samples must be at least 2 for an interval, got {samples}")
    if max_exact_params < 0:
        raise ConfigError(f"max_exact_params must be non-negative, got {max_exact_params}")
    check_buffer_bytes(buffer_bytes)
    with evaluating(model, device) as (work, dev):
        params = trainable_params(work)
        site = _site_of(work, params, name)
        size = params[name].numel()
        estimated = size > max(max_exact_params, 1)
        block: _DenseBlock | _KronBlock | _SampledBlock | None = None
        diag = total = torch.zeros((), dtype=torch.float64, device=dev)
        count = 0
        with tapped(dict([site]) if site else {}) as taps:
            for x, y in batches:
                batch = (x.to(dev), y.to(dev))
                for rows in _rows_of_batch(work, name, site, taps, batch, loss, buffer_bytes):
                    if block is None:
                        block = _new_block(
                            rows, size, estimated, samples, generator, dev, buffer_bytes
                        )
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
    buffer_bytes: int,
) -> _DenseBlock | _KronBlock | _SampledBlock:
    if estimated:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return _SampledBlock(size, samples, gen, device, buffer_bytes)
    if rows.delta is not None:
        delta, act = rows.factors()
        out_features, in_features = delta.shape[1], act.shape[1]
        return _KronBlock(out_features, in_features, delta.dtype, device, buffer_bytes)
    return _DenseBlock(size, device, buffer_bytes)


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

    common: dict[str, Any] = {
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
