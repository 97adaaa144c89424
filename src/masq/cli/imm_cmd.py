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
from typing import TYPE_CHECKING

from masq.cli.experiment_cmd import config_from_args, quiet_stderr
from masq.cli.options import add_run_flags, add_single_run_flags
from masq.config import RunConfig, hidden_text
from masq.errors import ConfigError
from masq.fileio import atomic_write

if TYPE_CHECKING:
    from masq.protocol.result import Result

# The library (torch, pandas, matplotlib) is imported inside the functions that run, so that
# `masq imm --help` loads none of it (as every command's help).
# The fields `masq imm` sets itself (it runs both merges; λ and γ are EWC's).
OWN: tuple[str, ...] = ("consolidation", "lam", "gamma")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    add_single_run_flags(p, curves=False)
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
    from masq.consolidation import canonical
    from masq.importance import get_measure

    if not get_measure(base.importance).gives_importance:
        raise ConfigError("masq imm: mode-IMM needs an importance; use --importance fisher or masq")
    mean = canonical(base.with_(consolidation="mean-imm").validate())
    mode = canonical(base.with_(consolidation="mode-imm").validate())
    return mean, mode


def run_pair(
    base: RunConfig, *, progress: bool = False, data_dir: str | None = None
) -> dict[str, Result]:
    """Mean-IMM and mode-IMM of ``base`` from one training: {label: Result}."""
    from masq import protocol
    from masq.consolidation import method_label

    mean, mode = imm_configs(base)
    tasks = protocol.make_tasks(mode, data_dir=data_dir)
    d1 = protocol.train_first(mode, tasks, progress=progress)
    imp, seconds = protocol.compute_importance(mode, d1, tasks)
    results = protocol.continue_runs(
        [mean, mode], d1, [({}, 0.0), (imp, seconds)], tasks, progress=progress
    )
    return {method_label(r.config): r for r in results}


def _imm(args: argparse.Namespace) -> int:
    from masq.fileio import save_png
    from masq.report.figures import FIGURE_DPI
    from masq.report.imm import summary_rows, sweep_figure
    from masq.report.runs import csv_text, markdown_table, run_stem, safe_name, text_table
    from masq.runtime import check_out_dir, resolve_device, setup_threads

    base = config_from_args(args, consolidation="mean-imm")  # both: run_pair
    setup_threads(args.threads)
    resolve_device(base.device)
    out = check_out_dir(args.out or f"results/imm-{safe_name(base.slt)}")
    start = time.perf_counter()
    with quiet_stderr(args.quiet):  # one line per phase
        results = run_pair(base, progress=True, data_dir=args.data_dir)
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
    from masq.fileio import save_png
    from masq.report.figures import FIGURE_DPI
    from masq.report.imm import alpha_rows, mean_sweeps, report_figure
    from masq.report.runs import csv_text, safe_name
    from masq.runtime import check_out_dir

    out = check_out_dir(args.out or args.results)
    sweeps = mean_sweeps(args.results)
    written = [
        save_png(report_figure(slt, by), out / f"imm_alpha_{safe_name(slt)}.png", dpi=FIGURE_DPI)
        for slt, by in sorted(sweeps.items())
    ]
    rows = alpha_rows(sweeps)
    if rows:
        written.append(atomic_write(out / "imm_alpha.csv", csv_text(rows)))
    best = [r for r in rows if not math.isnan(r["test_union"])]
    print(f"{len(sweeps)} SLTs, {len(best)} sweep points")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
