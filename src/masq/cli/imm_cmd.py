"""``masq imm`` (one IMM run: task 1, the later tasks trained on from the previous solution,
then mean-IMM and mode-IMM merges swept over α) and ``masq imm-report`` (the α figures of a
results directory's IMM runs, one per SLT).

``masq imm`` trains once and merges both ways: mean-IMM needs no importance, mode-IMM uses
``--importance`` (FIM or MaSQ, ``--scale``). The α sweep evaluates merged nets only (no
training). Outputs: a printed table, the two JSON records, imm.md / imm.csv and imm.png
(accuracy against the last task's weight α_T).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping
from typing import Any

from masq import protocol
from masq.cli.experiment_cmd import (
    _safe,
    config_from_args,
    csv_text,
    markdown_table,
    run_stem,
    text_table,
)
from masq.cli.options import add_run_flags
from masq.config import RunConfig, hidden_text
from masq.consolidation import method_label
from masq.consolidation.imm import SHARE
from masq.curves import VAL, task_name, union_name
from masq.errors import ConfigError
from masq.fileio import atomic_write, save_png
from masq.grid import canonical
from masq.importance import get_measure
from masq.protocol.result import Result
from masq.report.figures import FIGURE_DPI
from masq.report.imm import mean_sweeps, report_figure, sweep_figure
from masq.runtime import check_out_dir, resolve_device, setup_threads

# The fields `masq imm` sets itself (it runs both merges; λ and γ are EWC's).
OWN: tuple[str, ...] = ("consolidation", "lam", "gamma")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``imm`` and ``imm-report`` to ``sub``."""
    p = sub.add_parser(
        "imm",
        help="Incremental Moment Matching: train on, then merge (mean-IMM and mode-IMM) over α",
        description=(
            "Train task 1, then each later task from the previous solution (--transfer weight, "
            "l2, drop or l2-drop), compute each task's importance at its solution (--importance "
            "fisher or masq) and merge the solutions by mean-IMM and mode-IMM for every α of the "
            "sweep (--alpha-step); prints the val-selected and the test-best α and writes the "
            "two JSON records, imm.md, imm.csv and imm.png (accuracy against α) into --out."
        ),
    )
    add_run_flags(
        p,
        skip=OWN,
        defaults={"hidden": "per SLT (as masq run)", "lr2": "per SLT", "device": "auto"},
    )
    p.add_argument("--iters", type=int, default=None, help="iterations of every phase")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="directory with the IDX files")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_imm)

    r = sub.add_parser(
        "imm-report",
        help="figures of accuracy against α for the IMM runs of a results directory",
        description=(
            "For each SLT of --results: one figure of the accuracy on the union of all tasks "
            "against the last task's weight α_T, one panel per transfer, one line per IMM "
            "method (mean over seeds; dots: the val-selected α). Writes imm_alpha_<SLT>.png and "
            "imm_alpha.csv into --out."
        ),
    )
    r.add_argument("--results", required=True, help="results directory with IMM runs")
    r.add_argument("--out", default=None, help="output directory (default: the results dir)")
    r.set_defaults(func=_report)


def imm_configs(base: RunConfig) -> tuple[RunConfig, RunConfig]:
    """(mean-IMM, mode-IMM) configs of ``base``, canonical as in a grid (same run ids)."""
    if not get_measure(base.importance).gives_importance:
        raise ConfigError("masq imm: mode-IMM needs an importance; use --importance fisher or masq")
    mean = canonical(base.with_(consolidation="mean-imm").validate())
    mode = canonical(base.with_(consolidation="mode-imm").validate())
    return mean, mode


def run_pair(
    base: RunConfig, *, progress: bool = False, data_dir: str | None = None
) -> dict[str, Result]:
    """Mean-IMM and mode-IMM of ``base`` from one training: {label: Result}."""
    mean, mode = imm_configs(base)
    tasks = protocol.make_tasks(mode, data_dir=data_dir)
    d1 = protocol.train_first(mode, tasks, progress=progress)
    imp, seconds = protocol.compute_importance(mode, d1, tasks)
    results = protocol.continue_runs(
        [mean, mode], d1, [({}, 0.0), (imp, seconds)], tasks, progress=progress
    )
    return {method_label(r.config): r for r in results}


def summary_rows(results: Mapping[str, Result]) -> list[dict[str, Any]]:
    """One row per method: the val-selected and the test-best α_T with the accuracy there on
    the union of all tasks and each task, the uniform α, and θ_T alone (α_T = 1)."""
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


def _imm(args: argparse.Namespace) -> int:
    base = config_from_args(args, consolidation="mean-imm")  # both: run_pair
    setup_threads(args.threads)
    resolve_device(base.device)
    out = check_out_dir(args.out or f"results/imm-{_safe(base.slt)}")
    start = time.perf_counter()
    results = run_pair(base, progress=not args.quiet, data_dir=args.data_dir)
    seconds = time.perf_counter() - start
    written = []
    for result in results.values():
        stem = run_stem(result.config) + f"_{result.config.consolidation}"
        written.append(result.save(out / f"{stem}.json"))
    rows = summary_rows(results)
    written.append(atomic_write(out / "imm.md", markdown_table(rows) + "\n"))
    written.append(atomic_write(out / "imm.csv", csv_text(rows)))
    title = (
        f"{base.slt}, hidden {hidden_text(base.hidden)}, lr2 {base.lr2:g}, "
        f"{base.iters1}+{base.iters2} iterations, seed {base.seed}"
    )
    written.append(save_png(sweep_figure(results, title=title), out / "imm.png", dpi=FIGURE_DPI))
    print(f"{title}; transfer {base.transfer.value}; {seconds:.0f} s")
    print(text_table(rows))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out or args.results)
    sweeps = mean_sweeps(args.results)
    written = []
    rows = []
    for slt, by in sorted(sweeps.items()):
        written.append(
            save_png(report_figure(slt, by), out / f"imm_alpha_{_safe(slt)}.png", dpi=FIGURE_DPI)
        )
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
    if rows:
        written.append(atomic_write(out / "imm_alpha.csv", csv_text(rows)))
    best = [r for r in rows if not math.isnan(r["test_union"])]
    print(f"{len(sweeps)} SLTs, {len(best)} sweep points")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
