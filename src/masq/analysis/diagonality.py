"""How diagonal is the Fisher? Table 2 of the paper (§5.3), for every tensor.

For a trained network and N samples (x_n, y_n) of task 1's training data, every weight
matrix and bias vector gets the statistics of its full empirical Fisher block

    F_ij = (1/N) Σ_n g_ni g_nj,   g_n = ∂ loss(model(x_n), y_n) / ∂θ  (that tensor's P entries)

from :func:`masq.importance.fisher_block_stats` (exact up to ``max_exact_params``, estimated
with a confidence interval above): the sum and mean of the P diagonal entries, of the
P² − P off-diagonal entries and of their absolute values, and the ratios

    offdiag_abs_sum / diag_sum    the mass outside the diagonal per unit of mass on it;
    offdiag_abs_mean / diag_mean  a typical off-diagonal entry against a diagonal one.

:func:`fisher_block` builds the whole block of a small tensor (for heat maps) with
:func:`masq.importance.blocks.fisher_block`; its diagonal is :func:`masq.importance.fisher` of
that tensor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from masq import importance
from masq import protocol as masq_protocol
from masq.analysis.common import markdown, provenance, records, write_manifest
from masq.config import RunConfig, hidden_text
from masq.errors import ConfigError
from masq.fileio import atomic_write, save_png
from masq.importance.blocks import fisher_block as build_fisher_block

# The largest tensor whose whole block :func:`fisher_block` builds (P² float64: 128 MiB).
MAX_BLOCK_PARAMS = 4096

TABLE2_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "tensor"),
    ("shape", "shape"),
    ("num_params", "P"),
    ("mode", "mode"),
    ("diag_sum", "diag sum"),
    ("diag_mean", "diag mean"),
    ("offdiag_sum", "off-diag sum"),
    ("offdiag_mean", "off-diag mean"),
    ("offdiag_abs_sum", "off-diag Σ|F|"),
    ("offdiag_abs_mean", "off-diag mean |F|"),
    ("abs_sum_ratio", "off Σ|F| / diag sum"),
    ("abs_mean_ratio", "off mean |F| / diag mean"),
    ("seconds", "seconds"),
)


def block_statistics(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    names: Sequence[str] | None = None,
    *,
    batch_size: int = 1000,
    max_exact_params: int = 25_000,
    samples: int = 100_000,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
) -> pd.DataFrame:
    """One row per tensor (``names``; default every trainable one, in model order) with the
    fields of :class:`masq.importance.BlockStats`, the ratios of the module docstring, the
    tensor's ``shape``, ``mode`` ("exact" | "estimated") and the ``seconds`` it took.
    ``progress(name, seconds)`` is called after each tensor."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ConfigError(f"unknown tensors {unknown}; valid names: {', '.join(params)}")
    rows: list[dict[str, Any]] = []
    for name in names:
        start = time.perf_counter()
        stats = importance.fisher_block_stats(
            model,
            importance.batches(x, y, batch_size),
            name,
            max_exact_params=max_exact_params,
            samples=samples,
            generator=torch.Generator().manual_seed(seed),
        )
        seconds = time.perf_counter() - start
        row = dict(stats.__dict__)
        row.update(
            shape="×".join(str(s) for s in params[name].shape),
            mode="estimated" if stats.estimated else "exact",
            abs_sum_ratio=_ratio(stats.offdiag_abs_sum, stats.diag_sum),
            abs_mean_ratio=_ratio(stats.offdiag_abs_mean, stats.diag_mean),
            seconds=seconds,
        )
        rows.append(row)
        if progress is not None:
            progress(name, seconds)
    return pd.DataFrame(rows)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 and math.isfinite(b) else math.nan


def table2_markdown(table: pd.DataFrame, title: str = "") -> str:
    """Table 2 (every tensor) as Markdown."""
    return markdown(records(table), list(TABLE2_COLUMNS), title)


def fisher_block(model: nn.Module, x: Tensor, y: Tensor, name: str, *, chunk: int = 500) -> Tensor:
    """The whole empirical Fisher block F = (1/N) Σ_n g_n g_nᵀ (float64, P × P, entries in the
    tensor's row-major order) of tensor ``name``, g_n the gradient of sample n's cross-entropy:
    :func:`masq.importance.blocks.fisher_block` over (x, y) in batches of ``chunk`` samples (the
    model in eval mode, handed back as it was). For tensors of at most :data:`MAX_BLOCK_PARAMS`
    entries."""
    params = dict(model.named_parameters())
    if name not in params:
        raise ConfigError(f"unknown tensor {name!r}; valid names: {', '.join(params)}")
    size = params[name].numel()
    if size > MAX_BLOCK_PARAMS:
        raise ConfigError(
            f"tensor {name!r} has {size} entries; a whole block is built for at most "
            f"{MAX_BLOCK_PARAMS} (use block_statistics for larger ones)"
        )
    if len(x) == 0:
        raise ConfigError("no samples; pass at least one (x, y) pair")
    return build_fisher_block(model, importance.batches(x, y, chunk), name)


def heatmap_figure(blocks: Mapping[str, Tensor], *, title: str = "") -> Figure:
    """One heat map per block (signed, diverging colours). The colour range is ± the largest
    off-diagonal |F| of each block, so the off-diagonal structure is visible; the diagonal,
    larger, saturates (its range is written in the panel title)."""
    if not blocks:
        raise ValueError("heatmap_figure: no blocks")
    n = len(blocks)
    fig = Figure(figsize=(5.2 * n, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False).ravel()
    for ax, (name, block) in zip(axes, blocks.items(), strict=True):
        b = block.detach().double().cpu()
        off = b.clone()
        off.fill_diagonal_(0)
        vmax = float(off.abs().max()) or float(b.abs().max()) or 1.0
        image = ax.imshow(b.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        d = torch.diagonal(b)
        ax.set_title(
            f"{name} ({b.shape[0]} × {b.shape[0]})\ndiagonal {float(d.min()):.2g} … "
            f"{float(d.max()):.2g}; colours ± {vmax:.2g}",
            fontsize=9,
        )
        ax.set_xlabel("parameter j (row-major)")
        ax.set_ylabel("parameter i")
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


@dataclass
class Diagonality:
    """What :func:`diagonality` computed: Table 2 (one row per tensor), the whole blocks of
    the heat-map tensors, the state's accuracy on the samples used, and timings."""

    config: RunConfig
    table: pd.DataFrame
    blocks: dict[str, Tensor]
    samples: int
    train_accuracy: float
    train_seconds: float
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)

    def title(self) -> str:
        """e.g. "784-30-30-10 on D1 of D5-5, 5000 iterations (torch init, seed 0), N = 28038"."""
        c = self.config
        trained = (
            f"state {self.notes['state']}"
            if self.notes.get("state")
            else f"{c.iters1} iterations ({c.init} init, seed {c.seed})"
        )
        return f"784-{hidden_text(c.hidden)}-10 on D1 of {c.slt}, {trained}, N = {self.samples}"


def d1_samples(x: Tensor, y: Tensor, samples: int) -> tuple[Tensor, Tensor]:
    """The first ``samples`` pairs (0: all of them)."""
    if samples < 0:
        raise ConfigError(f"--samples must be >= 0 (0: all), got {samples}")
    return (x, y) if samples == 0 else (x[:samples], y[:samples])


def diagonality(
    config: RunConfig,
    *,
    state: Mapping[str, Tensor] | None = None,
    samples: int = 0,
    names: Sequence[str] | None = None,
    heatmaps: Sequence[str] | None = None,
    max_exact_params: int = 25_000,
    data_dir: str | None = None,
    tasks: list[Any] | None = None,
    progress: Callable[[str, float], None] | None = None,
    state_source: str | None = None,
) -> Diagonality:
    """Table 2 for the network of ``config`` trained on task 1 (``config.iters1`` iterations
    via :func:`masq.protocol.train_first`, or ``state`` if given), over the first ``samples``
    of task 1's training data (0: all). ``heatmaps`` (default: the last weight matrix and the
    last bias vector) get their whole block (:func:`fisher_block`). ``state_source`` names
    where a given ``state`` came from (shown instead of the training settings)."""
    config = config.validate()
    tasks = masq_protocol.make_tasks(config, data_dir=data_dir) if tasks is None else tasks
    train_seconds = 0.0
    if state is None:
        d1 = masq_protocol.train_first(config, tasks)
        state, train_seconds = d1.state_dict, d1.seconds
    model = masq_protocol.build_model(config, tasks)
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(
            f"the state does not fit 784-{hidden_text(config.hidden)}-10 ({first}); "
            "give the --hidden it was trained with"
        ) from None
    model.eval()
    train: tuple[Tensor, Tensor] = tasks[0].train
    x, y = d1_samples(*train, samples)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).double().mean())
    start = time.perf_counter()
    table = block_statistics(
        model, x, y, names, max_exact_params=max_exact_params, progress=progress
    )
    param_names = [n for n, _ in model.named_parameters()]
    heat = list(heatmaps) if heatmaps is not None else param_names[-2:]
    blocks = {name: fisher_block(model, x, y, name) for name in heat}
    return Diagonality(
        config=config,
        table=table,
        blocks=blocks,
        samples=len(x),
        train_accuracy=accuracy,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - start,
        notes={"state": state_source} if state is not None and state_source else {},
    )


def write_outputs(
    result: Diagonality, out: str | Path, *, command: str, total_seconds: float
) -> tuple[str, list[Path]]:
    """Write ``out``/table2.md, table2.csv, fisher_blocks.png and the manifest
    diagonality.json; (the Markdown table, the paths written)."""
    out = Path(out)
    title = f"Table 2: full empirical Fisher block per tensor; {result.title()}"
    md = table2_markdown(result.table, title)
    figure = heatmap_figure(result.blocks, title=result.title())
    written = [
        save_png(figure, out / "fisher_blocks.png"),
        atomic_write(out / "table2.md", md),
        atomic_write(out / "table2.csv", result.table.to_csv(index=False)),
    ]
    body = {
        "command": command,
        "title": title,
        "config": result.config.to_dict(),
        "samples": result.samples,
        "state": result.notes.get("state"),
        "train_accuracy": result.train_accuracy,
        "seconds": {
            "train": result.train_seconds,
            "statistics": result.seconds,
            "total": total_seconds,
        },
        "provenance": provenance(),
        "files": {"markdown": "table2.md", "csv": "table2.csv", "figures": ["fisher_blocks.png"]},
    }
    written.append(write_manifest(out, "diagonality", body))
    return md, written
