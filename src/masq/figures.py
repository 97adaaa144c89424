"""Curve figures in the paper's style (matplotlib, Agg canvas, PNG written atomically).

Three panels: test accuracy on D1, on D2 and on D1 ∪ D2 over training on D1 (iterations
0..iters1) and then re-training on D2 (iters1..iters1 + iters2, shaded), one line style per
method. Runs that share their D1 phase (as in ``masq compare``) draw it once.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masq.experiment import UNION, Result, method_label
from masq.fileio import atomic_write

PANELS: tuple[str, ...] = ("D1", "D2", UNION)
# (colour, line style) per method, in order of appearance.
LineStyle = str | tuple[int, tuple[int, ...]]
STYLES: tuple[tuple[str, LineStyle], ...] = (
    ("black", ":"),
    ("tab:blue", "--"),
    ("tab:red", "-"),
    ("tab:green", "-."),
    ("tab:purple", (0, (3, 1, 1, 1))),
    ("tab:orange", (0, (5, 2))),
)


def curves_figure(results: Mapping[str, Result], *, title: str | None = None) -> Figure:
    """The three-panel figure of ``results`` ({legend label: Result})."""
    if not results:
        raise ValueError("curves_figure: no results to plot")
    fig = Figure(figsize=(13, 4.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS), sharey=True)
    items = list(results.items())
    first = items[0][1]
    iters1 = first.config.iters1
    shared_d1 = all(r.curve_d1 == first.curve_d1 for _, r in items)
    end = iters1 + max(r.config.iters2 for _, r in items)
    for ax, name in zip(axes, PANELS, strict=True):
        ax.axvspan(iters1, end, color="0.9", zorder=0, label="re-training on D2")
        if shared_d1:
            _plot(ax, first.curve_d1, name, 0, "0.35", "-", "training on D1", 2)
        for i, (label, result) in enumerate(items):
            colour, style = STYLES[i % len(STYLES)]
            z = 3 + len(items) - i  # earlier methods on top: dotted lines stay visible
            if not shared_d1:
                _plot(ax, result.curve_d1, name, 0, colour, style, None, z)
            _plot(ax, result.curve_d2, name, result.config.iters1, colour, style, label, z)
        ax.set_title(f"test accuracy on {name}")
        ax.set_xlabel("iteration (training on D1, then on D2)")
        ax.set_xlim(0, end)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.suptitle(title or default_title(first))
    return fig


def _plot(
    ax: Axes,
    curve: Mapping[str, list[float]],
    name: str,
    offset: int,
    colour: str,
    style: LineStyle,
    label: str | None,
    zorder: float,
) -> None:
    if name not in curve:
        return
    xs = [offset + it for it in curve["iteration"]]
    ax.plot(
        xs, curve[name], color=colour, linestyle=style, linewidth=1.6, label=label, zorder=zorder
    )


def default_title(result: Result) -> str:
    """e.g. "D5-5, hidden 800-800, lr1 0.001, lr2 1e-05, λ 1e+05, seed 0"."""
    c = result.config
    widths = "-".join(str(h) for h in c.hidden)
    return f"{c.slt}, hidden {widths}, lr1 {c.lr1:g}, lr2 {c.lr2:g}, λ {c.lam:g}, seed {c.seed}"


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write(path, buffer.getvalue())


def plot_results(
    results: Mapping[str, Result], path: str | Path, *, title: str | None = None
) -> Path:
    """:func:`curves_figure` of ``results`` saved to ``path``; labels default to the methods."""
    return save_figure(curves_figure(results, title=title), path)


def label_results(results: Mapping[str, Result]) -> dict[str, Result]:
    """{method label: Result} for results keyed by anything."""
    return {method_label(r.config): r for r in results.values()}
