"""``masq table1``: Table 1, settled (resumable); ``masq export`` / ``masq import``: records.

masq table1 --results results/table1 --dry-run             # per stage: runs to do, time
masq table1 --results results/table1 --out docs/table1     # the campaign, then the report
masq table1 --results results/table1 --stage report        # only the tables and figures
masq export --results results/table1 --to docs/table1/records.jsonl.gz
masq import --from docs/table1/records.jsonl.gz --results results/table1

The campaign is :data:`masq.analysis.settle.CAMPAIGN`. SLT by SLT (in the order given):
``plane`` (the seed-0 grid), ``extend`` (λ × 10 for every series whose "last" still rises
at its largest λ, repeated until none does), ``confirm`` (each seed-0 winner, selected on
test and on validation, the no-EWC winners with ε2 tuned alike among them, and the λ = 0
counterpart of each EWC "last" winner, on --seeds); then
``report`` writes the tables and figures of whatever is stored (:mod:`masq.report.settled`).
Every run goes through :func:`masq.grid.execute` into --results, so re-running resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from masq.cli.common import (
    at_least_one,
    done_text,
    execute,
    print_failed,
    print_plan,
    resolve_workers,
    tasks_fn,
)
from masq.cli.options import add_execution_flags
from masq.errors import ConfigError
from masq.runtime import check_out_dir
from masq.slt import parse_spec

STAGES: tuple[str, ...] = ("all", "plane", "extend", "confirm", "report")


# masq.analysis.settle.CAMPAIGN's SLTs and confirmation seeds, written here so that `--help`
# does not load torch; tests/test_settle.py checks they agree.
DEFAULT_SLTS: tuple[str, ...] = ("D5-5", "D9-1", "DP10-10")
DEFAULT_SEEDS: tuple[int, ...] = (1, 2, 3, 4)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``table1``, ``export`` and ``import`` to ``sub`` (without loading the campaign,
    which loads torch: its defaults are :data:`DEFAULT_SLTS` and :data:`DEFAULT_SEEDS`)."""
    p = sub.add_parser(
        "table1",
        help="Table 1, settled: ε2 × λ planes, extension, confirmation on fresh seeds, tests",
        description="Per SLT at its paper-best architecture: ε2 in {1e-3..1e-6} × λ in "
        "{0, 0.1, 1, ..., 1e10} (extended upward while 'last' still rises) × FIM / MaSQ (mean) "
        "× init torch / tf on seed 0 (dense-early evaluation, validation curves, bf16); the "
        "winners selected on test and on validation re-run on --seeds; settled tables, paired "
        "t-tests MaSQ vs FIM, inflation and figures into --out. Resumable.",
    )
    add = p.add_argument
    add("--results", required=True, metavar="DIR", help="the campaign's results dir")
    add("--out", default=None, metavar="DIR", help="tables and figures (default: --results)")
    add("--slt", nargs="+", default=list(DEFAULT_SLTS), help="SLTs (default: all three)")
    add("--stage", choices=STAGES, default="all", help="what to do (default: all, then report)")
    add("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
        help="confirmation seeds (default: 1 2 3 4)")  # fmt: skip
    add("--dry-run", action="store_true", help="print the runs to do and the estimate; run none")
    add_execution_flags(p)
    p.set_defaults(func=run_table1)

    e = sub.add_parser(
        "export",
        help="every valid run record of a results dir into one .jsonl.gz (deterministic)",
        description="Write every valid record of DIR/runs/ as one gzip JSON Lines file, sorted "
        "by run id (same records, same bytes); cached states are not included.",
    )
    e.add_argument("--results", required=True, metavar="DIR", help="results dir to read")
    e.add_argument("--to", required=True, metavar="FILE", help="the .jsonl.gz to write")
    e.set_defaults(func=run_export)

    i = sub.add_parser(
        "import",
        help="restore the run records of a .jsonl.gz into a results dir",
        description="Validate every record of FILE like the store does, then write those not "
        "stored yet into DIR (created if needed); a damaged file writes nothing.",
    )
    i.add_argument("--from", dest="source", required=True, metavar="FILE", help="a .jsonl.gz")
    i.add_argument("--results", required=True, metavar="DIR", help="results dir to fill")
    i.set_defaults(func=run_import)


# ----------------------------------------------------------------------------- export, import


def run_export(args: argparse.Namespace) -> int:
    """``masq export``."""
    from masq.archive import export_records

    count = export_records(args.results, args.to)
    print(f"{count} record(s) of {args.results} written to {args.to}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """``masq import``."""
    from masq.archive import import_records

    done = import_records(args.source, args.results)
    print(f"{done.written} record(s) imported into {args.results}; {done.skipped} were stored")
    return 0


# ----------------------------------------------------------------------------- table1


class Runner:
    """Runs (or, with --dry-run, counts) lists of configs into the results dir."""

    def __init__(self, args: argparse.Namespace) -> None:
        at_least_one(("--stack", args.stack))
        self.args = args
        self.workers, self.threads = resolve_workers(args.workers, args.threads)
        self.tasks_fn = tasks_fn(args.data_dir)
        self.estimated: list[float] = []  # seconds per --dry-run estimate printed

    def frame(self) -> Any:
        """The stored runs as a DataFrame (empty when none)."""
        import pandas as pd

        from masq.store import load

        root = Path(self.args.results)
        return load(root) if (root / "meta.json").exists() else pd.DataFrame()

    def dry(self, label: str, configs: Sequence[Any], note: str = "") -> None:
        """Print the counts, the shared work and the time estimate of ``configs``."""
        seconds = print_plan(
            configs,
            self.args.results,
            stack=self.args.stack,
            workers=self.workers,
            threads=self.threads,
            label=f"{label}: {len(configs)} runs" + (f" ({note})" if note else "") + "; ",
        )
        if seconds:
            self.estimated.append(seconds)

    def run(self, configs: Sequence[Any]) -> bool:
        """Execute ``configs`` (stored ones are skipped); False when some failed."""
        if not configs:
            return True
        summary = execute(
            "table1", configs, self.args.results, workers=self.workers, stack=self.args.stack,
            threads=self.threads, progress=not self.args.no_progress, tasks_fn=self.tasks_fn,
        )  # fmt: skip
        if summary is None:
            return False
        print(f"  {done_text(summary)}; {summary.seconds:.0f} s", flush=True)
        if summary.failed:
            print_failed(summary.failed, self.args.results)
        return not summary.failed


def _confirm_configs(runner: Runner, campaign: Any, slt: str) -> list[Any]:
    from masq.analysis import settle
    from masq.report.settled import select_winners

    df = runner.frame()
    configs: list[Any] = []
    for select_on in settle.SELECT_ON:
        winners = select_winners(df, campaign, select_on)
        if not winners.empty:
            winners = winners[winners["slt"] == slt]
            configs += settle.confirmation_configs(winners, df, campaign.confirm_seeds)
    return settle.unique(configs)


def _stage(runner: Runner, campaign: Any, slt: str, stage: str) -> bool:
    """Run (or count) one stage of one SLT; False when some run failed."""
    from masq.analysis import settle

    if stage == "plane":
        configs = settle.plane_configs(campaign, slt)
        if runner.args.dry_run:
            runner.dry(f"{slt} plane", configs)
            return True
        print(f"{slt}: plane, {len(configs)} runs", flush=True)
        return runner.run(configs)
    if stage == "extend":
        if runner.args.dry_run:
            configs = settle.extension_configs(runner.frame(), campaign, slt)
            runner.dry(f"{slt} extend", configs, "first round, from the stored seed-0 runs; "
                       "later rounds depend on its results")  # fmt: skip
            return True
        rounds = 0
        while configs := settle.extension_configs(runner.frame(), campaign, slt):
            rounds += 1
            lams = sorted({c.lam for c in configs})
            print(f"{slt}: extension round {rounds}, {len(configs)} runs at λ {lams}", flush=True)
            if not runner.run(configs):
                return False
        return True
    configs = _confirm_configs(runner, campaign, slt)
    if runner.args.dry_run:
        runner.dry(f"{slt} confirm", configs, "only the winners of the seed-0 runs stored now; "
                   "complete once plane and extend are")  # fmt: skip
        return True
    print(f"{slt}: confirmation, {len(configs)} runs", flush=True)
    return runner.run(configs)


def run_table1(args: argparse.Namespace) -> int:
    """``masq table1``."""
    from masq.analysis import settle

    campaign = settle.with_confirm_seeds(settle.CAMPAIGN, args.seeds)
    slts = list(dict.fromkeys(parse_spec(s).text for s in args.slt))
    for slt in slts:
        campaign.hidden(slt)  # an SLT outside the campaign: a one-line error
    runner = Runner(args)
    stages = ("plane", "extend", "confirm") if args.stage == "all" else (args.stage,)
    ok = True
    if args.stage != "report":
        for slt in slts:
            for stage in stages:
                if not _stage(runner, campaign, slt, stage):
                    ok = False
                    break
    if args.dry_run:
        total = sum(runner.estimated) / 3600
        print(f"in all: {total:.2f} h estimated for the runs that can be counted now")
        return 0
    _report(args, campaign, slts)  # whatever is stored, failed runs or not
    return 0 if ok else 1


def _report(args: argparse.Namespace, campaign: Any, slts: list[str]) -> None:
    from masq.report.settled import write_outputs
    from masq.store import load

    if not (Path(args.results) / "meta.json").exists():
        raise ConfigError(
            f"no results at {args.results!r}; run `masq table1 --results {args.results}` first"
        )
    out = check_out_dir(args.out or args.results)
    notes, written = write_outputs(args.results, load(args.results), out, campaign, slts)
    for note in notes:
        print(f"not stored yet: {note}")
    print(f"written: {', '.join(str(p) for p in written)}")
