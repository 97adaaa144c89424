"""Figures in the paper's style (matplotlib, Agg canvas, PNG written atomically).

- :func:`curves_figure`: test accuracy on every task and on the union of all tasks over the
  phases of a run (task 1 from iteration 0 to iters1, then each later task for iters2,
  shaded), one line style per method; runs that share their first phase (as in
  ``masq compare``) draw it once. For two tasks: the paper's three panels D1, D2, D1∪D2.
- :func:`accuracy_figure`: the accuracy matrix ``R[i][j]`` of a run as a heat map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masq.config import hidden_text
from masq.consolidation import method_label
from masq.curves import task_name, union_name
from masq.fileio import save_png
from masq.protocol.result import Result

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

FIGURE_DPI = 120  # the resolution of the figures of `masq run`, `masq compare` and the report


def phase_offsets(result: Result) -> list[int]:
    """The iteration at which each phase starts: 0, iters1, iters1 + iters2, ..."""
    c = result.config
    return [0] + [c.iters1 + t * c.iters2 for t in range(len(result.curves) - 1)]


def panels(n_tasks: int) -> list[str]:
    """The sets drawn: every task's test set, then the union of all tasks."""
    return [*(task_name(j) for j in range(n_tasks)), union_name(n_tasks)]


def curves_figure(results: Mapping[str, Result], *, title: str | None = None) -> Figure:
    """The figure of ``results`` ({legend label: Result}, runs of one SLT)."""
    if not results:
        raise ValueError("curves_figure: no results to plot")
    items = list(results.items())
    first = items[0][1]
    names = panels(len(first.curves))
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.4 * cols, 3.9 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    shared = all(r.curves[0] == first.curves[0] for _, r in items)
    offsets = phase_offsets(first)
    end = max(phase_offsets(r)[-1] + r.config.iters2 for _, r in items)
    for ax, name in zip(axes, names, strict=False):
        for t, start in enumerate(offsets[1:], start=1):
            stop = offsets[t + 1] if t + 1 < len(offsets) else end
            label = "training on a later task" if t == 1 else None
            ax.axvspan(start, stop, color="0.9" if t % 2 else "0.82", zorder=0, label=label)
        if shared:
            _plot(ax, first.curves[0], name, 0, "0.35", "-", "training on D1", 2)
        for i, (label, result) in enumerate(items):
            colour, style = STYLES[i % len(STYLES)]
            z = 3 + len(items) - i  # earlier methods on top: dotted lines stay visible
            starts = phase_offsets(result)
            for t, curve in enumerate(result.curves):
                if t == 0 and shared:
                    continue
                _plot(ax, curve, name, starts[t], colour, style, label if t == 1 else None, z)
        ax.set_title(f"test accuracy on {name}")
        ax.set_xlabel("iteration (training on D1, then on each later task)")
        ax.set_xlim(0, end)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    # at most three entries a row: six long labels in one row run past the figure's edges
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3),
               frameon=False)  # fmt: skip
    fig.suptitle(title or default_title(first))
    return fig


def _plot(
    ax: Axes,
    curve: Mapping[str, Sequence[float]],
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


def accuracy_figure(result: Result, *, title: str | None = None) -> Figure:
    """The accuracy matrix ``R[i][j]`` (test accuracy on task j after phase i) as a heat map, the
    values written in the cells, with ACC, BWT and forgetting in the title."""
    r = result.accuracy
    n = len(r)
    fig = Figure(figsize=(1.1 * n + 2.4, 1.0 * n + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(r, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * r[i][j]:.1f}", ha="center", va="center",
                    color="black" if r[i][j] > 0.6 else "white", fontsize=9)  # fmt: skip
    ticks = list(range(n))
    ax.set_xticks(ticks, [task_name(j) for j in ticks])
    ax.set_yticks(ticks, [f"after {task_name(i)}" for i in ticks])
    ax.set_xlabel("test accuracy on task")
    fig.colorbar(image, ax=ax, fraction=0.05)
    m = result.metrics
    fig.suptitle(
        title
        or f"{result.config.slt}, {method_label(result.config)}: ACC "
        f"{100 * m['average_accuracy']:.1f} %, BWT {100 * m['bwt']:.1f} %, "
        f"forgetting {100 * m['forgetting']:.1f} %",
        fontsize=10,
    )
    return fig


def default_title(result: Result) -> str:
    """e.g. "D5-5, hidden 800-800, lr1 0.001, lr2 1e-05, λ 1e+05, seed 0"."""
    c = result.config
    return (
        f"{c.slt}, hidden {hidden_text(c.hidden)}, lr1 {c.lr1:g}, lr2 {c.lr2:g}, "
        f"λ {c.lam:g}, seed {c.seed}"
    )


def plot_results(
    results: Mapping[str, Result], path: str | Path, *, title: str | None = None
) -> Path:
    """:func:`curves_figure` of ``results`` saved to ``path``."""
    return save_png(curves_figure(results, title=title), path, dpi=FIGURE_DPI)
