"""``masq analyze kfac``: does the Fisher's off-diagonal part change what consolidation
achieves? EWC with the diagonal FIM, K-FAC, per-layer Fisher blocks and MaSQ, each at its own
λ chosen on validation, over seeds (:mod:`masq.analysis.structure`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from masq.cli.analyze_common import (
    SWEEP_FIELDS,
    add_lam_flags,
    command_text,
    hidden_of,
    print_written,
    slt_text,
)
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
from masq.config import FIELD, RunConfig, hidden_text
from masq.defaults import PAPER_SLTS, paper_best
from masq.errors import ConfigError
from masq.runtime import check_out_dir

if TYPE_CHECKING:
    import pandas as pd

_PAPER = " ".join(PAPER_SLTS)
# The names of masq.analysis.structure.STRUCTURES, written here so that building the parser
# (`masq --help`) does not load pandas and torch; tests/test_structure.py checks they agree.
STRUCTURES: tuple[str, ...] = ("diagonal FIM", "K-FAC", "FIM blocks", "MaSQ (mean)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "kfac",
        help="does the Fisher's off-diagonal part matter? EWC with the diagonal FIM, K-FAC, "
        "per-layer Fisher blocks and MaSQ, each at its own λ, over seeds",
        description="For each SLT (at its paper-best architecture and ε2 unless given): EWC "
        "with the Fisher as its diagonal, as K-FAC (G ⊗ A per layer) and as the exact "
        "per-layer block (small nets), all with the same labels on the same subset of "
        "training samples, and MaSQ mean; λ from --lam-min to --lam-max, chosen per measure "
        "on the validation sets, reported on the test sets over --seeds seeds with a paired "
        "t-test against the diagonal. A resumable grid. Writes kfac.md, kfac.csv, "
        "kfac_points.csv, kfac.png and kfac.json.",
    )
    add = p.add_argument
    add("--slt", nargs="+", default=list(PAPER_SLTS), help=f"SLTs (default: {_PAPER})")
    add("--hidden", nargs="+", default=None, metavar="N", help="net (default: paper-best)")
    add("--lr2", type=float, default=None, help="ε2 for every SLT (default: paper-best)")
    add("--scenario", default="class", help="class | task | domain (default: class)")
    add("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    add("--measures", nargs="+", default=list(STRUCTURES), metavar="M",
        help=f"measures compared (default: all of {', '.join(STRUCTURES)})")  # fmt: skip
    add("--fisher-labels", default="exact", help="labels of the Fisher structures (exact)")
    add("--fisher-samples", type=int, default=1000,
        help="training samples per task of the Fisher structures (default: 1000)")  # fmt: skip
    add_lam_flags(add, SWEEP_FIELDS, per_decade=1)
    add("--blocks-window", type=int, default=-1, metavar="DECADES",
        help="for big nets: the blocks (the costly structure) run after the others, only at "
        "the λ within DECADES decades of the diagonal FIM's λ chosen on validation; -1: the "
        "whole λ grid like the others (default: -1)")  # fmt: skip
    add("--tune-seeds", type=int, default=0, metavar="K",
        help="sweep λ on the K smallest seeds only, choose it on their validation sets, and "
        "run the other seeds at that λ alone (0: every seed sweeps; default: 0)")  # fmt: skip
    add("--results", default="results/kfac", metavar="DIR", help="the runs' results dir")
    add("--out", default=None, metavar="DIR", help="tables, figure (default: the results dir)")
    add("--dry-run", action="store_true", help="print the runs and a time estimate; run nothing")
    add("--tabulate", action="store_true",
        help="run nothing: tabulate the runs already stored (a partial campaign)")  # fmt: skip
    add_execution_flags(p)
    p.set_defaults(func=run_kfac)


def run_kfac(args: argparse.Namespace) -> int:
    """``masq analyze kfac``."""
    from masq.analysis import structure
    from masq.analysis.sweep import lam_grid
    from masq.runid import run_id
    from masq.store import load

    lams = lam_grid(args.lam_min, args.lam_max, args.per_decade)
    at_least_one(("--seeds", args.seeds), ("--stack", args.stack))
    if args.fisher_samples < 0:
        raise ConfigError(f"--fisher-samples must be >= 0 (0: all), got {args.fisher_samples}")
    if args.tune_seeds < 0:
        raise ConfigError(f"--tune-seeds must be >= 0 (0: every seed sweeps), got "
                          f"{args.tune_seeds}")  # fmt: skip
    base = {n: getattr(args, n) for n in SWEEP_FIELDS if getattr(args, n) is not None}
    if args.blocks_window < -1:
        raise ConfigError(f"--blocks-window must be >= 0 (or -1: all λ), got {args.blocks_window}")
    windowed = structure.BLOCKS in args.measures and args.blocks_window >= 0
    first_pass = [m for m in args.measures if not (windowed and m == structure.BLOCKS)]
    configs: list[RunConfig] = []
    firsts: list[RunConfig] = []
    slts = [slt_text(s) for s in args.slt]
    described = []
    for slt in slts:
        hidden_d, lr2_d = paper_best(slt)
        first = RunConfig(slt=slt, hidden=hidden_of(args.hidden, hidden_d),
                          lr2=lr2_d if args.lr2 is None else args.lr2,
                          scenario=args.scenario).with_(**base)  # fmt: skip
        firsts.append(first)
        described.append({"slt": slt, "hidden": hidden_text(first.hidden), "lr2": first.lr2})
        configs += structure.structure_configs(
            first, lams, args.seeds, measures=first_pass, labels=args.fisher_labels,
            samples=args.fisher_samples,
        )  # fmt: skip
    workers, threads = resolve_workers(args.workers, args.threads, args.device)
    sweeps = _sweeps(configs, args.tune_seeds)
    first_runs = [c for tuning, _ in sweeps for c in tuning]
    held_seeds = sum(len({c.seed for c in held}) for _, held in sweeps)
    print(f"kfac: {len(configs)} runs ({len(slts)} SLT(s) × {args.seeds} seed(s) × (λ = 0 + "
          f"{len(lams)} λ from {lams[0]:g} to {lams[-1]:g} × {len(first_pass)} "
          f"measure(s)))")  # fmt: skip
    if args.tune_seeds:
        print(f"with --tune-seeds {args.tune_seeds}: {len(first_runs)} runs (the sweeps on "
              f"seed(s) 0..{args.tune_seeds - 1}, no EWC on every seed), then {held_seeds} "
              "runs: the other seeds at each sweep's λ chosen on validation")  # fmt: skip
    window_runs = len(slts) * args.seeds * (2 * args.blocks_window + 1)
    if windowed:
        print(f"then {structure.BLOCKS}: at most {window_runs} runs, at the λ within "
              f"{args.blocks_window} decade(s) of the diagonal FIM's chosen λ per SLT")  # fmt: skip
    if args.dry_run:
        print_plan(first_runs, args.results, stack=args.stack, workers=workers, threads=threads)
        return 0
    seconds = 0.0

    def run_all(todo: list[RunConfig]) -> bool:
        nonlocal seconds
        summary = execute("analyze kfac", todo, args.results, workers=workers,
                          stack=args.stack, threads=threads, progress=not args.no_progress,
                          tasks_fn=tasks_fn(args.data_dir))  # fmt: skip
        if summary is None:
            return False
        print(f"{done_text(summary)}; {summary.seconds:.0f} s")
        seconds += summary.seconds
        if summary.failed:
            print_failed(summary.failed, args.results)
        return True

    if not args.tabulate and not run_all(first_runs):
        return 1
    if args.tune_seeds and not args.tabulate:
        held = _held_configs(load(args.results), sweeps, args.tune_seeds)
        print(f"kfac: {len(held)} runs of the other seeds at the λ chosen on validation")
        if held and not run_all(held):
            return 1
    blocks: list[RunConfig] = []
    if windowed:
        blocks = _window_configs(args, firsts, lams, configs)
        if blocks and not args.tabulate and not run_all(blocks):
            return 1
        configs += blocks
    ids = {run_id(c) for c in configs}
    df = load(args.results)
    stored = df[df["run_id"].isin(ids)] if not df.empty else df
    if stored.empty:
        raise ConfigError(f"none of these runs is stored in {args.results!r} yet; run them first")
    frame = structure.structure_frame(stored)
    table = structure.structure_table(frame, args.tune_seeds)
    out = check_out_dir(args.out or args.results)
    words = ["masq", "analyze", "kfac", "--slt", *slts]
    words += ["--hidden", *args.hidden] if args.hidden else []
    words += ["--lr2", args.lr2] if args.lr2 is not None else []
    words += ["--scenario", args.scenario, "--seeds", args.seeds, "--measures", *args.measures]
    words += ["--fisher-labels", args.fisher_labels, "--fisher-samples", args.fisher_samples]
    for name, value in base.items():
        words += [FIELD[name].flag, value]
    words += ["--lam-min", args.lam_min, "--lam-max", args.lam_max,
              "--per-decade", args.per_decade, "--blocks-window", args.blocks_window,
              "--results", args.results]  # fmt: skip
    words += ["--tune-seeds", args.tune_seeds] if args.tune_seeds else []
    words += ["--out", args.out] if args.out else []
    body = {"command": command_text(words), "slts": described, "seeds": args.seeds,
            "lams": lams, "tune_seeds": args.tune_seeds,
            "runs": len(first_runs) + held_seeds if args.tune_seeds else len(configs),
            "runs_stored": len(stored),
            "results": str(args.results), "seconds": {} if args.tabulate else {"grid": seconds},
            "config": {k: str(v) for k, v in base.items()}}  # fmt: skip
    md, written = structure.write_outputs(table, frame, out, body=body, tune_seeds=args.tune_seeds)
    print(md, end="")
    if args.tune_seeds:  # the sweeps, then one run per held seed at its sweep's λ
        wanted = first_runs + _held_configs(df, sweeps, args.tune_seeds) + blocks
        expected = len({run_id(c) for c in first_runs}) + held_seeds + len(blocks)
    else:
        wanted, expected = configs, len(ids)
    have = len({run_id(c) for c in wanted} & set(stored["run_id"]))
    if have < expected:
        print(f"partial: {have} of {expected} runs stored; run again to finish")
    print_written(written)
    return 0


def _sweeps(
    configs: list[RunConfig], tune_seeds: int
) -> list[tuple[list[RunConfig], list[RunConfig]]]:
    """(tuning runs, held runs) of each measure's λ sweep per SLT, net and scenario
    (:func:`masq.grid.tune.tuning_split`; no EWC, one λ, runs on every seed)."""
    from masq.analysis.structure import structure_of
    from masq.grid.tune import tuning_split

    groups: dict[tuple[str, str, str, str], list[RunConfig]] = {}
    for c in configs:
        key = (c.slt, hidden_text(c.hidden), str(c.scenario), structure_of(c.to_dict()))
        groups.setdefault(key, []).append(c)
    return [tuning_split(cs, tune_seeds) for cs in groups.values()]


def _held_configs(
    df: pd.DataFrame, sweeps: list[tuple[list[RunConfig], list[RunConfig]]], tune_seeds: int
) -> list[RunConfig]:
    """The held seeds' runs at the λ each sweep chose on the validation sets of its tuning
    runs stored in ``df`` (the results dir's :func:`masq.store.load`;
    :func:`masq.analysis.structure.chosen_lambda`, :func:`masq.grid.tune.held_at_chosen`); a
    sweep not fully stored waits."""
    from masq.analysis import structure
    from masq.grid.tune import held_at_chosen

    def choose(_: int, ids: list[str]) -> float:
        frame = structure.structure_frame(df[df["run_id"].isin(ids)])
        measure = str(frame["measure"].iloc[0])
        return next(iter(structure.chosen_lambda(frame, measure, tune_seeds).values()))

    stored = set() if df.empty else set(df["run_id"])
    return held_at_chosen(dict(enumerate(sweeps)), stored, choose)[0]


def _window_configs(
    args: argparse.Namespace,
    firsts: list[RunConfig],
    lams: list[float],
    done: list[RunConfig],
) -> list[RunConfig]:
    """The blocks' runs of each SLT at the λ of its window around the diagonal FIM's λ
    chosen on validation over the stored runs of ``done`` (none where it has no runs yet)."""
    from masq.analysis import structure
    from masq.runid import run_id
    from masq.store import load

    ids = {run_id(c) for c in done}
    df = load(args.results)
    stored = df[df["run_id"].isin(ids)] if not df.empty else df
    if stored.empty:
        return []
    centres = structure.chosen_lambda(structure.structure_frame(stored), tune_seeds=args.tune_seeds)
    out: list[RunConfig] = []
    for first in firsts:
        key = (first.slt, hidden_text(first.hidden), str(first.scenario))
        if key not in centres:
            print(f"{structure.BLOCKS}: no diagonal FIM runs of {first.slt} stored; skipped")
            continue
        window = structure.lam_window(lams, centres[key], args.blocks_window)
        print(f"{structure.BLOCKS} of {first.slt}: λ {', '.join(f'{v:g}' for v in window)} "
              f"(the diagonal FIM's chosen λ is {centres[key]:g})")  # fmt: skip
        runs = structure.structure_configs(
            first, window, args.seeds, measures=[structure.BLOCKS], labels=args.fisher_labels,
            samples=args.fisher_samples,
        )  # fmt: skip
        out += [c for c in runs if run_id(c) not in ids]
    return out
