"""The tables and files of single runs (``masq run``, ``masq compare``, ``masq imm``): a run's
file-name stem, the rows of the side-by-side comparison, and those rows as fixed-width text,
Markdown and CSV; the curves as long CSV and as TensorBoard scalars; the accuracy matrix as
text."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masq.config import FisherLabels, RunConfig, hidden_text
from masq.curves import task_name, union_name
from masq.errors import ConfigError
from masq.report.figures import phase_offsets
from masq.runid import run_id

if TYPE_CHECKING:
    from masq.protocol.result import Result

TENSORBOARD_HINT = "--tensorboard needs the tensorboard package: pip install masq-ewc[tensorboard]"


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits and ``._+-`` replaced by "_"."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def run_stem(config: RunConfig) -> str:
    """A file-name stem naming a run: a readable prefix, then the run id
    (:func:`masq.runid.run_id`, the hash of everything that changes the numbers), e.g.
    D5-5_800-800_masq-mean_lr2-1e-05_lam-100000_seed0_0123456789abcdef0123. Two runs that differ
    in anything the prefix does not show (init, iterations, precision, ...) never share a name,
    so a second ``masq run --out DIR`` never replaces the first one's files; a re-run of the same
    configuration writes the same name."""
    method = str(config.importance)
    if method == "masq":
        method = f"masq-{config.scale}"
    elif method == "fisher" and config.fisher_labels != FisherLabels.EMPIRICAL:
        method = f"fisher-{config.fisher_labels}"
    if config.consolidation == "online-ewc" and method != "none":
        method = f"online-{method}-g{config.gamma:g}"
    hidden = hidden_text(config.hidden)
    prefix = f"{config.slt}_{hidden}_{method}_lr2-{config.lr2:g}_lam-{config.lam:g}"
    return safe_name(f"{prefix}_seed{config.seed}_{run_id(config)}")


def compare_rows(results: Mapping[str, Result]) -> list[dict[str, Any]]:
    """One row per method: best/last on the union of all tasks, each task at the end, and
    (T > 2) ACC, BWT and forgetting, seconds."""
    rows = []
    for label, r in results.items():
        n = len(r.curves)
        union = union_name(n)
        row: dict[str, Any] = {
            "method": label,
            f"best {union}": r.best[union],
            "best at it": r.best["iteration"],
            f"last {union}": r.last[union],
        }
        row |= {f"last {task_name(j)}": r.last[task_name(j)] for j in range(n)}
        if n > 2:
            row |= {name: r.metrics[name] for name in ("average_accuracy", "bwt", "forgetting")}
        row["importance s"] = float(sum(r.timings.get("importance", [])))
        row["re-train s"] = float(sum(r.timings.get("train", [0.0])[1:]))
        rows.append(row)
    return rows


def accuracy_text(result: Result) -> str:
    """The accuracy matrix R[i][j] (in %) and ACC, BWT and forgetting as text."""
    n = len(result.accuracy)
    head = "R[i][j] %     " + " ".join(f"{task_name(j):>6}" for j in range(n))
    lines = [head]
    for i, row in enumerate(result.accuracy):
        cells = " ".join(f"{100 * v:6.1f}" for v in row)
        lines.append(f"after {task_name(i):<7} {cells}")
    m = result.metrics
    lines.append(
        f"ACC {100 * m['average_accuracy']:.2f} %, BWT {100 * m['bwt']:.2f} %, "
        f"forgetting {100 * m['forgetting']:.2f} %"
    )
    return "\n".join(lines)


def cell(key: str, value: object) -> str:
    """A table cell: seconds (a key ending in " s") with two decimals, an accuracy (a float
    <= 1) with four, other floats with one; a NaN accuracy (a diverged run's) as "diverged",
    never as a number."""
    if key.endswith(" s") and isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, float) and value != value:
        return "diverged"
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1.0 else f"{value:.1f}"
    return str(value)


def _aligned(words: list[str], widths: list[int]) -> str:
    """The first word left-aligned, the others right-aligned, two spaces apart."""
    return "  ".join(
        w.ljust(n) if i == 0 else w.rjust(n)
        for i, (w, n) in enumerate(zip(words, widths, strict=True))
    )


def text_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of ``rows``."""
    keys = list(rows[0])
    cells = [[cell(k, row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    return "\n".join(_aligned(words, widths) for words in [keys, *cells])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """GitHub-flavoured Markdown table of ``rows``."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    lines += ["| " + " | ".join(cell(k, row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV of ``rows`` (full precision)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def curves_csv(results: Mapping[str, Result]) -> str:
    """Long CSV of the curves: run, phase (the task trained: D1, D2, ...), iteration (from the
    phase's start), step (from the start of training on D1), then one column per set (empty
    where a phase did not evaluate it, e.g. the union of the tasks seen so far)."""
    sets: list[str] = []
    for r in results.values():
        for curve in r.curves:
            sets += [k for k in curve if k != "iteration" and k not in sets]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "phase", "iteration", "step", *sets])
    for name, r in results.items():
        for t, (curve, offset) in enumerate(zip(r.curves, phase_offsets(r), strict=True)):
            for i, it in enumerate(curve["iteration"]):
                values = [curve[s][i] if s in curve else "" for s in sets]
                writer.writerow([name, task_name(t), it, offset + it, *values])
    return buffer.getvalue()


def summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line ConfigError when missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_HINT) from None
    return SummaryWriter


def write_tensorboard(results: Mapping[str, Result], directory: Path) -> None:
    """Scalars ``accuracy/<set>`` per run under ``directory/<run>``, step from D1's start."""
    writer_cls = summary_writer()
    for name, r in results.items():
        writer = writer_cls(log_dir=str(directory / safe_name(name)))
        try:
            for curve, offset in zip(r.curves, phase_offsets(r), strict=True):
                sets = [k for k in curve if k != "iteration"]
                for i, it in enumerate(curve["iteration"]):
                    for s in sets:
                        writer.add_scalar(f"accuracy/{s}", curve[s][i], global_step=offset + it)
        finally:
            writer.close()


__all__ = [
    "TENSORBOARD_HINT",
    "accuracy_text",
    "cell",
    "compare_rows",
    "csv_text",
    "curves_csv",
    "markdown_table",
    "run_stem",
    "safe_name",
    "summary_writer",
    "text_table",
    "write_tensorboard",
]
