"""``masq run`` (one two-task EWC run) and ``masq compare`` (the headline: one D1 state,
re-trained on D2 without EWC, with EWC+FIM and with EWC+MaSQ in both scales)."""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from masq import experiment as ex
from masq import figures
from masq.errors import ConfigError
from masq.fileio import atomic_write
from masq.runtime import check_out_dir, resolve_device, setup_threads
from masq.tasks import parse_spec

# Per-SLT defaults when --hidden / --lr2 are not given (PAPER.md section 5's best
# configurations as the lead chose them); lambda defaults to 1 / lr2.
SLT_DEFAULTS: dict[str, tuple[tuple[int, ...], float]] = {
    "D5-5": ((800, 800), 1e-5),
    "D9-1": ((800, 400, 400), 1e-4),
    "DP10-10": ((800, 800, 200), 1e-5),
}
FALLBACK_DEFAULTS = SLT_DEFAULTS["D5-5"]
TENSORBOARD_HINT = "--tensorboard needs the tensorboard package: pip install masq-ewc[tensorboard]"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run`` and ``compare`` to ``sub``."""
    run = sub.add_parser(
        "run",
        help="one two-task EWC run: train D1, consolidate (FIM or MaSQ), re-train D2",
        description=(
            "Train on D1, compute the importance (FIM, MaSQ or none) on D1's training data, "
            "re-train on D2 with the EWC penalty; print a one-line summary and write the "
            "JSON record and a figure of the curves into --out."
        ),
    )
    _knobs(run)
    run.add_argument(
        "--importance",
        default="masq",
        metavar="KIND",
        help="fisher | masq | none (default: masq)",
    )
    run.add_argument(
        "--scale", default="mean", metavar="S", help="MaSQ scale: mean (the paper) | sum"
    )
    run.set_defaults(func=_run)

    compare = sub.add_parser(
        "compare",
        help="the headline: one D1 state re-trained four ways (no EWC, FIM, MaSQ mean/sum)",
        description=(
            "Train D1 once, compute FIM and MaSQ (scale mean and sum) from that one state and "
            "re-train on D2 from it four ways: no EWC, EWC+FIM, EWC+MaSQ (mean), EWC+MaSQ (sum). "
            "Prints a side-by-side table and writes compare.md, compare.csv, compare.png and "
            "the four JSON records into --out."
        ),
    )
    _knobs(compare)
    compare.set_defaults(func=_compare)


def _knobs(p: argparse.ArgumentParser) -> None:
    defaults = ", ".join(
        f"{slt}: {'-'.join(map(str, h))}, lr2 {lr:g}" for slt, (h, lr) in SLT_DEFAULTS.items()
    )
    p.add_argument("--slt", default="D5-5", help="sequential learning task (default: D5-5)")
    p.add_argument(
        "--hidden",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help=f"hidden layer sizes (default per SLT: {defaults})",
    )
    p.add_argument("--init", default="torch", metavar="I", help="torch (default) | tf")
    p.add_argument("--lr1", type=float, default=1e-3, help="Adam learning rate on D1 (1e-3)")
    p.add_argument("--lr2", type=float, default=None, help="Adam learning rate on D2 (per SLT)")
    p.add_argument("--lam", type=float, default=None, help="EWC weight λ (default: 1 / lr2)")
    p.add_argument(
        "--masq-batch", type=int, default=1000, metavar="B", help="B_MaSQ (default: 1000)"
    )
    p.add_argument(
        "--fisher-labels",
        default="true",
        metavar="L",
        help="FIM labels: true (the paper) | sampled | exact",
    )
    p.add_argument("--iters", type=int, default=5000, help="iterations of each phase (5000)")
    p.add_argument("--iters1", type=int, default=None, help="iterations on D1 (overrides --iters)")
    p.add_argument("--iters2", type=int, default=None, help="iterations on D2 (overrides --iters)")
    p.add_argument("--batch-size", type=int, default=100, help="mini-batch size B (100)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=ex.ExperimentConfig.eval_every,
        metavar="N",
        help=f"evaluate every N iterations (default: {ex.ExperimentConfig.eval_every})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random stream (0)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--dataset", default="mnist", help="dataset name (default: mnist)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="directory with the IDX files")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory")
    p.add_argument("--csv", action="store_true", help="also write the curves as CSV")
    p.add_argument("--tensorboard", metavar="DIR", default=None, help="write TensorBoard scalars")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace, **changes: Any) -> ex.ExperimentConfig:
    """The validated ExperimentConfig of the parsed knobs (per-SLT defaults filled in)."""
    slt = parse_spec(args.slt).text
    default_hidden, default_lr2 = SLT_DEFAULTS.get(slt, FALLBACK_DEFAULTS)
    hidden = default_hidden if args.hidden is None else tuple(args.hidden)
    lr2 = default_lr2 if args.lr2 is None else args.lr2
    if args.lam is not None:
        lam = args.lam
    elif lr2 > 0 and math.isfinite(lr2):
        lam = float(f"{1.0 / lr2:.12g}")  # 1 / 1e-5 = 100000.0, not 99999.99999999999
    else:
        lam = 0.0  # lr2 itself is reported as the error below
    config = ex.ExperimentConfig(
        slt=slt,
        dataset=args.dataset,
        hidden=hidden,
        init=args.init,
        lr1=args.lr1,
        lr2=lr2,
        lam=lam,
        masq_batch=args.masq_batch,
        fisher_labels=args.fisher_labels,
        iters1=args.iters if args.iters1 is None else args.iters1,
        iters2=args.iters if args.iters2 is None else args.iters2,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
    )
    return config.with_(**changes).validate()


def _prepare(args: argparse.Namespace, config: ex.ExperimentConfig, default_out: str) -> Path:
    """Everything that can fail on input, before any training: threads, device, out, extras."""
    setup_threads(args.threads)
    resolve_device(config.device)
    if args.tensorboard is not None:
        summary_writer()
    return check_out_dir(args.out or default_out)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args, importance=args.importance, scale=args.scale)
    out = _prepare(args, config, "results/run")
    start = time.perf_counter()
    result = ex.run(config, progress=not args.quiet, data_dir=args.data_dir)
    seconds = time.perf_counter() - start
    stem = run_stem(config)
    label = ex.method_label(config)
    written = [result.save(out / f"{stem}.json")]
    written.append(figures.plot_results({label: result}, out / f"{stem}.png"))
    if args.csv:
        written.append(atomic_write(out / f"{stem}.csv", curves_csv({stem: result})))
    if args.tensorboard is not None:
        write_tensorboard({stem: result}, Path(args.tensorboard))
    b, last = result.best, result.last
    print(
        f"{config.slt} {label} λ={config.lam:g} lr2={config.lr2:g}: "
        f"best D1∪D2 {b[ex.UNION]:.4f} (it {b['iteration']}), last {last[ex.UNION]:.4f} "
        f"(D1 {last['D1']:.4f}, D2 {last['D2']:.4f}) in {seconds:.0f} s; "
        f"wrote {', '.join(str(p) for p in written)}"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    base = config_from_args(args)
    out = _prepare(args, base, f"results/compare-{_safe(base.slt)}")
    start = time.perf_counter()
    results = ex.compare(base, progress=not args.quiet, data_dir=args.data_dir)
    seconds = time.perf_counter() - start
    labelled = {ex.method_label(r.config): r for r in results.values()}
    rows = compare_rows(labelled)
    for key, result in results.items():
        result.save(out / f"{key}.json")
    atomic_write(out / "compare.md", markdown_table(rows) + "\n")
    atomic_write(out / "compare.csv", csv_text(rows))
    title = f"{figures.default_title(results['masq-mean'])} (EWC runs)"
    figures.plot_results(labelled, out / "compare.png", title=title)
    if args.csv:
        atomic_write(out / "curves.csv", curves_csv(results))
    if args.tensorboard is not None:
        write_tensorboard(results, Path(args.tensorboard))
    d1 = next(iter(results.values()))
    print(
        f"{base.slt}, hidden {'-'.join(map(str, base.hidden))}, lr1 {base.lr1:g}, "
        f"lr2 {base.lr2:g}, λ {base.lam:g}, {base.iters1}+{base.iters2} iterations, "
        f"seed {base.seed}; D1 accuracy after training {d1.curve_d1['D1'][-1]:.4f}"
    )
    print(text_table(rows))
    print(f"{seconds:.0f} s in all; wrote {out}/compare.md, compare.csv, compare.png, *.json")
    return 0


def compare_rows(results: Mapping[str, ex.Result]) -> list[dict[str, Any]]:
    """One row per method: best/last D1∪D2, D1 and D2 at the end, seconds."""
    rows = []
    for label, r in results.items():
        rows.append(
            {
                "method": label,
                "best D1∪D2": r.best[ex.UNION],
                "best at it": r.best["iteration"],
                "last D1∪D2": r.last[ex.UNION],
                "last D1": r.last["D1"],
                "last D2": r.last["D2"],
                "importance s": r.timings.get("importance", 0.0),
                "re-train s": r.timings.get("d2_train", 0.0),
            }
        )
    return rows


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1.0 else f"{value:.1f}"
    return str(value)


def _seconds_cell(key: str, value: object) -> str:
    if key.endswith(" s") and isinstance(value, float):
        return f"{value:.2f}"
    return _cell(value)


def text_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of ``rows``."""
    keys = list(rows[0])
    cells = [[_seconds_cell(k, row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [
        "  ".join(
            k.ljust(w) if i == 0 else k.rjust(w)
            for i, (k, w) in enumerate(zip(keys, widths, strict=True))
        )
    ]
    for c in cells:
        lines.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(c, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """GitHub-flavoured Markdown table of ``rows``."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    lines += ["| " + " | ".join(_seconds_cell(k, row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV of ``rows`` (full precision)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def curves_csv(results: Mapping[str, ex.Result]) -> str:
    """Long CSV of the curves: run, phase (D1 | D2), iteration (from the phase's start),
    step (from the start of training on D1), then one column per evaluated set."""
    first = next(iter(results.values()))
    sets = [k for k in first.curve_d2 if k != "iteration"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "phase", "iteration", "step", *sets])
    for name, r in results.items():
        for phase, curve, offset in (("D1", r.curve_d1, 0), ("D2", r.curve_d2, r.config.iters1)):
            for i, it in enumerate(curve["iteration"]):
                writer.writerow([name, phase, it, offset + it, *(curve[s][i] for s in sets)])
    return buffer.getvalue()


def summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line ConfigError when missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_HINT) from None
    return SummaryWriter


def write_tensorboard(results: Mapping[str, ex.Result], directory: Path) -> None:
    """Scalars ``accuracy/<set>`` per run under ``directory/<run>``, step from D1's start."""
    writer_cls = summary_writer()
    for name, r in results.items():
        writer = writer_cls(log_dir=str(directory / _safe(name)))
        try:
            for curve, offset in ((r.curve_d1, 0), (r.curve_d2, r.config.iters1)):
                sets = [k for k in curve if k != "iteration"]
                for i, it in enumerate(curve["iteration"]):
                    for s in sets:
                        writer.add_scalar(f"accuracy/{s}", curve[s][i], global_step=offset + it)
        finally:
            writer.close()


def run_stem(config: ex.ExperimentConfig) -> str:
    """A file-name stem naming a run, e.g. D5-5_800-800_masq-mean_lr2-1e-05_lam-100000_seed0."""
    method = config.importance
    if method == "masq":
        method = f"masq-{config.scale}"
    elif method == "fisher" and config.fisher_labels != "true":
        method = f"fisher-{config.fisher_labels}"
    hidden = "-".join(map(str, config.hidden))
    return _safe(
        f"{config.slt}_{hidden}_{method}_lr2-{config.lr2:g}_lam-{config.lam:g}_seed{config.seed}"
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)
