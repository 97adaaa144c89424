"""Figures, tables and averages of IMM runs (``masq imm``, ``masq imm-report``): the merged
net's accuracy against the weight α_T of the last task, per method and transfer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masq.config import RunConfig
from masq.consolidation import method_label
from masq.consolidation.imm import SHARE
from masq.curves import VAL, task_name, union_name
from masq.errors import ConfigError
from masq.report.figures import STYLES
from masq.store import load, load_record

if TYPE_CHECKING:
    from masq.protocol.result import Result


def _plot_sweep(
    ax: Axes, sweep: Mapping[str, Sequence[float]], n: int, style: Any, label: str
) -> None:
    colour, line = style
    x = sweep[SHARE]
    union = union_name(n)
    ax.plot(x, sweep[union], color=colour, linestyle=line, label=f"{label}: {union}")
    for j in range(n):
        ax.plot(x, sweep[task_name(j)], color=colour, linestyle=line, linewidth=0.7, alpha=0.5)


def sweep_figure(results: Mapping[str, Result], *, title: str = "") -> Figure:
    """Test accuracy of the merged net against α_T for each method: the union of all tasks
    (thick), every task (thin), the val-selected α (dot) and the test-best α (cross)."""
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (label, r), style in zip(results.items(), STYLES[1:] * 3, strict=False):
        n = len(r.curves)
        union = union_name(n)
        _plot_sweep(ax, r.imm["sweep"], n, style, label)
        for key, marker in (("val_selected", "o"), ("test_best", "x")):
            p = r.imm[key]
            ax.plot([p["share"]], [p[union]], marker=marker, color=style[0], linestyle="")
    ax.set_xlabel("α_T (weight of the last task; α_1 = … = 1 − α_T shared)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="o val-selected α, x test-best α", title_fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def mean_sweeps(root: str | Path) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """{SLT: {(transfer label, method label): mean sweep over seeds}} of the IMM runs of
    ``root``, with "val_share": the mean val-selected α_T and "seeds"."""
    df = load(root)
    if df.empty or "consolidation" not in df.columns:
        raise ConfigError(f"no IMM runs in {str(root)!r}; run `masq grid --consolidation mode-imm`")
    df = df[df["consolidation"].isin(["mean-imm", "mode-imm"])]
    if df.empty:
        raise ConfigError(f"no IMM runs in {str(root)!r}; run `masq grid --consolidation mode-imm`")
    out: dict[str, dict[tuple[str, str], dict[str, list[Any]]]] = {}
    for _, row in df.sort_values("run_id").iterrows():
        record = load_record(root, row["run_id"])["result"]
        config = RunConfig.from_dict(record["config"])
        method = method_label(config.with_(transfer="weight"))
        transfer = imm_transfer_label(config)
        slot = out.setdefault(config.slt, {}).setdefault((transfer, method), {})
        n = config.n_tasks
        sweep = record["imm"]["sweep"]
        for key in (SHARE, union_name(n), VAL + union_name(n)):
            slot.setdefault(key, []).append(sweep[key])
        slot.setdefault("val_share", []).append(record["imm"]["val_selected"]["share"])
    return {slt: {k: _mean(v) for k, v in d.items()} for slt, d in out.items()}


def summary_rows(results: Mapping[str, Result]) -> list[dict[str, Any]]:
    """One row per method of ``masq imm``: the val-selected and the test-best α_T with the
    accuracy there on the union of all tasks and each task, the uniform α, and θ_T alone
    (α_T = 1)."""
    rows = []
    for label, r in results.items():
        n = len(r.curves)
        union = union_name(n)
        val, best, uniform = r.imm["val_selected"], r.imm["test_best"], r.imm["uniform"]
        row: dict[str, Any] = {"method": label, "val-selected α_T": val["share"]}
        row[f"{union} (val-selected)"] = val[union]
        row |= {f"{task_name(j)} (val-selected)": val[task_name(j)] for j in range(n)}
        row["test-best α_T"] = best["share"]
        row[f"{union} (test-best)"] = best[union]
        row[f"{union} (uniform α)"] = uniform[union]
        row[f"{union} (α_T = 1)"] = r.last[union]
        row["merge s"] = float(sum(r.timings.get("merge", [])))
        rows.append(row)
    return rows


def alpha_rows(
    sweeps: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """The rows of ``imm_alpha.csv``: per SLT, transfer, method (sorted) and α_T of
    :func:`mean_sweeps`, the mean test and validation accuracy on the union of all tasks."""
    rows = []
    for slt, by in sorted(sweeps.items()):
        for (transfer, method), s in sorted(by.items()):
            union = next(k for k in s if "∪" in k and not k.startswith(VAL))
            for i, share in enumerate(s[SHARE]):
                rows.append(
                    {
                        "slt": slt,
                        "transfer": transfer,
                        "method": method,
                        "seeds": s["seeds"],
                        "alpha_T": share,
                        "test_union": s[union][i],
                        "val_union": s[VAL + union][i],
                    }
                )
    return rows


def imm_transfer_label(config: RunConfig) -> str:
    """ "weight transfer", "L2-transfer λ=0.001", "drop-transfer p=0.5", or both."""
    label = method_label(config)
    return label.split(", ", 1)[1] if ", " in label else "weight transfer"


def _mean(values: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": len(values["val_share"])}
    for key, runs in values.items():
        if key == "val_share":
            out[key] = sum(runs) / len(runs)
            continue
        lengths = {len(r) for r in runs}
        if len(lengths) != 1:
            raise ConfigError("imm-report: runs of one method have different α sweeps")
        out[key] = [sum(col) / len(col) for col in zip(*runs, strict=True)]
    return out


def report_figure(slt: str, sweeps: Mapping[tuple[str, str], Mapping[str, Any]]) -> Figure:
    """One panel per transfer, one line per method: test accuracy on the union of all tasks
    against α_T (mean over seeds), a dot at the mean val-selected α_T."""
    transfers = sorted({t for t, _ in sweeps})
    fig = Figure(figsize=(5.2 * len(transfers), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(transfers), sharey=True, squeeze=False).ravel()
    methods = sorted({m for _, m in sweeps})
    styles = dict(zip(methods, STYLES[1:] * 3, strict=False))
    for ax, transfer in zip(axes, transfers, strict=True):
        for method in methods:
            s = sweeps.get((transfer, method))
            if s is None:
                continue
            union = next(k for k in s if "∪" in k and not k.startswith(VAL))
            x, y = s[SHARE], s[union]
            colour, line = styles[method]
            seeds = f"{s['seeds']} seed" + ("s" if s["seeds"] > 1 else "")
            ax.plot(x, y, color=colour, linestyle=line, label=f"{method} ({seeds})")
            i = min(range(len(x)), key=lambda k: abs(x[k] - s["val_share"]))
            ax.plot([x[i]], [y[i]], marker="o", color=colour, linestyle="")
        ax.set_title(f"{slt}, {transfer}", fontsize=9)
        ax.set_xlabel("α_T (weight of the last task)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, title="o: mean val-selected α", title_fontsize=7)
    axes[0].set_ylabel("test accuracy on the union of all tasks")
    return fig


__all__ = [
    "alpha_rows",
    "imm_transfer_label",
    "mean_sweeps",
    "report_figure",
    "summary_rows",
    "sweep_figure",
]
