"""``masq grid``, ``masq table``, ``masq consistency`` and ``masq migrate``: the paper's grid
search, its tables, and the conversion of results directories of masq 0.1.

masq grid --preset paper --results runs/paper            # the whole paper grid
masq grid --preset paper --results runs/paper --dry-run  # counts and a time estimate
masq grid --slt D5-5 --hidden 200-200 --lam-per-lr2 0 0.1 1 10 --seeds 3 --results r
masq table --results runs/paper [--select-on val] [--group-by importance scale]
masq consistency --results runs/paper                    # the paper's section 5.2 figures
masq migrate runs/old                                    # a masq 0.1 results dir, in place
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from masq.cli.common import (
    at_least_one,
    done_text,
    execute,
    holds_results,
    hours,
    print_failed,
    print_plan,
    resolve_workers,
    tasks_fn,
)
from masq.cli.options import (
    NO_CONSOLIDATION,
    add_execution_flags,
    add_grid_flags,
    add_shorthand_flags,
    dest,
    shorthand_values,
)
from masq.config import FIELDS, RunConfig, Stage
from masq.errors import ConfigError
from masq.fileio import error_text

# The library (torch, pandas) is imported inside the functions that run: building the parser,
# and so `masq grid --help`, loads none of it.


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``grid``, ``table`` and ``consistency`` to ``sub``."""
    _register_grid(sub)
    _register_table(sub)
    _register_consistency(sub)
    _register_migrate(sub)


def _register_grid(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "grid",
        help="run an exhaustive grid of experiments (resumable)",
        description="Run every configuration of a grid into a results directory; re-running "
        "skips what is stored. Axes: a preset (none unless --preset is given), then a TOML grid "
        "file, then flags; an axis given by none of them has RunConfig's one default value.",
    )
    p.add_argument(
        "--preset",
        default="none",
        help="grid preset, e.g. paper (the paper's grid: 1,728 runs), or a published table "
        "(`masq peers --list`: its runs, row by row; the flags override every cell); default: "
        "none (one run of RunConfig's defaults, changed by the grid file and the flags)",
    )
    p.add_argument(
        "--grid", dest="grid_file", default=None, help="TOML grid file (overrides preset)"
    )
    add_grid_flags(p)
    p.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="ROW",
        help="with a published table's preset: run only these rows (e.g. the published ones "
        "first); default: every row",
    )
    axes = p.add_argument_group("more axes")
    add_shorthand_flags(axes)  # --iters, --lr: one value each, as in masq run
    axes.add_argument(
        "--lam-per-lr2",
        nargs="+",
        type=float,
        default=None,
        metavar="C",
        help="EWC weights relative to ε2: λ = c / ε2",
    )
    axes.add_argument("--layers", nargs="+", type=int, default=None, metavar="L",
                      help="hidden-layer counts (with --sizes: every combination)")  # fmt: skip
    axes.add_argument("--sizes", nargs="+", type=int, default=None, metavar="N",
                      help="hidden-layer sizes (with --layers)")  # fmt: skip
    axes.add_argument(
        "--seeds", type=int, default=None, metavar="N", help="repeat every run with seeds 0..N-1"
    )
    axes.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--results", default=None, help="results directory (created; resumable)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another grid is running on --results, wait for it instead of refusing",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the counts, shared work and a measured time estimate; run nothing",
    )
    add_execution_flags(p, ray=True)
    p.set_defaults(func=run_grid)


def _register_table(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "table",
        help="the paper's Table 1 from stored results",
        description="Print and write (Markdown, CSV) Table 1 per SLT.",
    )
    p.add_argument("--results", required=True, help="results directory")
    p.add_argument(
        "--select-on",
        choices=("test", "val"),
        default="test",
        help="select on the test curves (the paper) or the validation curves",
    )
    p.add_argument(
        "--group-by",
        nargs="+",
        default=[],
        help="one winner per value of these fields, e.g. importance scale init",
    )
    p.add_argument("--out", default=None, help="output directory (default: the results dir)")
    p.set_defaults(func=run_table)


def _register_consistency(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "consistency",
        help="re-run each SLT's best configuration with FIM and without EWC; figures",
        description="The paper's section 5.2: for each SLT's best configuration, run it with "
        "λ = 0 and with FIM at λ = 1/ε2 (stored in the same results dir) and draw D1, D2 and "
        "D1∪D2 over training and re-training.",
    )
    p.add_argument("--results", required=True, help="results directory of a finished grid")
    p.add_argument("--criterion", choices=("best", "last"), default="best")
    p.add_argument("--select-on", choices=("test", "val"), default="test")
    p.add_argument("--out", default=None, help="figure directory (default: RESULTS/figures)")
    add_execution_flags(p, ray=True)
    p.set_defaults(func=run_consistency)


# ----------------------------------------------------------------------------- grid


def grid_from_args(args: argparse.Namespace) -> Any:
    """The Grid of the command line: preset, then grid file, then flags."""
    from masq import grid as masq_grid

    base = masq_grid.Grid() if args.preset == "none" else masq_grid.load_preset(args.preset)
    if args.grid_file is not None:
        base = masq_grid.load_grid_file(args.grid_file, base)
    return masq_grid.grid_from_mapping(flag_values(args), base, where="command line")


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The grid keys the command line gives (the axes its flags set)."""
    values: dict[str, Any] = {}
    for spec in FIELDS:
        if spec.stage == Stage.RUN:
            continue
        value = getattr(args, dest(spec))
        if value is not None:
            values[spec.name] = value
    if NO_CONSOLIDATION in values.get("consolidation", ()):
        raise ConfigError(
            "--consolidation none: the runs without consolidation are --importance none (or "
            "--lam 0); add none to --importance, e.g. --importance none fisher"
        )
    for name, value in shorthand_values(args).items():
        values.setdefault(name, [value])
    for key in ("lam_per_lr2", "layers", "sizes"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.seeds is not None:
        if "seed" in values:
            raise ConfigError("give either --seeds N or --seed (a list), not both")
        values["seeds"] = args.seeds
    if args.device is not None:
        values["device"] = args.device
    return values


def describe_axes(grid: Any) -> str:
    """ "3 slt × 36 hidden × ..." for the axes with more than one value."""
    parts = []
    for name, values in grid.axes().items():
        if name in ("lam", "lam_per_lr2"):
            continue
        if len(values) > 1:
            parts.append(f"{len(values)} {name}")
    n_lam = len(grid.lam) + len(grid.lam_per_lr2)
    if n_lam > 1:
        parts.append(f"{n_lam} λ")
    return " × ".join(parts) if parts else "1 configuration"


def _part_of(n: int, total: int, noun: str) -> str:
    """E.g. "2 of its 10 rows", "3 columns", "1 column"."""
    if n < total:
        return f"{n} of its {total} {noun}s"
    return f"{n} {noun}" + ("" if n == 1 else "s")


def run_grid(args: argparse.Namespace) -> int:
    """``masq grid``."""
    from masq import grid as search
    from masq.grid import peer_manifest, peers
    from masq.grid.executors import check_devices
    from masq.store import Store

    preset = peers.load_peer_preset(args.preset) if peers.is_peer_preset(args.preset) else None
    if preset is not None:
        if args.grid_file is not None:
            raise ConfigError(f"--preset {args.preset} is a published table; it takes flags, "
                              "not a --grid file")  # fmt: skip
        overrides = flag_values(args)
        cells = preset.cells(overrides, args.rows)
        configs = preset.configs(overrides, args.rows)
        n_rows = len(set(args.rows)) if args.rows else len(preset.rows)
        n_cols = len(preset.selected_columns(overrides))
        rows_text = _part_of(n_rows, len(preset.rows), "row")
        described = f"{rows_text} × {_part_of(n_cols, len(preset.columns), 'column')} of "
        described += preset.title
        size = sum(len(c) for c in cells.values())
    else:
        if args.rows is not None:
            raise ConfigError("--rows selects rows of a published table's preset "
                              "(`masq peers --list`); this grid has no rows")  # fmt: skip
        grid = grid_from_args(args)
        configs = search.expand(grid)
        described, size = describe_axes(grid), grid.size()
    if args.executor == "local":  # Ray workers may have GPUs this machine lacks
        check_devices(configs)
    workers, threads = resolve_workers(args.workers, args.threads, args.device)
    at_least_one(("--stack", args.stack))
    print(
        f"grid: {len(configs)} runs ({described}; {size} combinations, "
        "merged where a setting cannot change the result, e.g. the importance at λ = 0)"
    )
    if args.dry_run:
        print_plan(configs, args.results, stack=args.stack, workers=workers, threads=threads)
        if preset is not None and preset.tunes:
            print(_held_text(preset, cells, args.results))
        return 0
    if args.results is None:
        raise ConfigError("masq grid: give --results DIR (or --dry-run)")
    Store(args.results).check_writable()
    if preset is not None:  # before the runs: an interrupted campaign tabulates what it has
        peer_manifest.write_manifest(args.results, preset, overrides, cells)

    def run_all(todo: list[RunConfig]) -> int:
        summary = _execute("grid", todo, args, workers, threads, wait=args.wait)
        if summary is None:
            return 1
        print(
            f"{done_text(summary)}; {summary.d1_trained} task-1 trainings and "
            f"{summary.importance_computed} importance passes computed; "
            f"{hours(summary.seconds)}"
        )
        if summary.failed:
            print_failed(summary.failed, args.results)
            return 1
        _say_checkpoints_left(args.results)
        return 0

    def rounds() -> int:
        rc = run_all(configs)
        if rc or preset is None or not preset.tunes:
            return rc
        from masq.analysis import peers as peer_analysis
        from masq.store import load

        held, waiting = peer_analysis.held_configs(preset, cells, load(args.results))
        print(f"grid: {len(held)} table runs at each sweep's λ chosen on its "
              f"{_tuning_text(preset)}" + (f"; {waiting} sweep(s) not complete"
                                           if waiting else ""))  # fmt: skip
        return run_all(held) if held else 0

    from masq.grid.executors import results_lock

    with results_lock(Store(args.results), wait=args.wait):  # one lock for both rounds
        return rounds()


def _say_checkpoints_left(results: str) -> None:
    """One line when phase checkpoints remain after a grid whose runs all ended: its own are
    deleted as its runs are stored, so these belong to runs of other grids, stopped."""
    from masq.protocol.resume import PHASES_DIR, checkpoints_left

    count, size = checkpoints_left(Path(results))
    if count:
        where = Path(results) / PHASES_DIR
        print(f"grid: {count} phase checkpoint(s) of runs not in this grid remain in {where} "
              f"({size / 1e6:.0f} MB): they resume those runs when their grid runs again; "
              "delete them if it will not")  # fmt: skip


def _execute(
    command: str,
    configs: Sequence[RunConfig],
    args: argparse.Namespace,
    workers: int,
    threads: int,
    **extra: Any,
) -> Any:
    """:func:`masq.cli.common.execute` with the executor flags ``masq grid`` and ``masq
    consistency`` share: the resolved threads per worker locally, the flag's value on Ray
    (whose workers may have other cores)."""
    return execute(command, configs, args.results, workers=workers, stack=args.stack,
                   executor=args.executor, address=args.address, ray_timeout=args.ray_timeout,
                   threads=threads if args.executor == "local" else args.threads,
                   progress=not args.no_progress, tasks_fn=tasks_fn(args.data_dir),
                   **extra)  # fmt: skip


def _held_text(preset: Any, cells: Mapping[str, Sequence[RunConfig]], results: Any) -> str:
    """What a peer preset with tuning seeds runs after its sweeps (the dry run's last line)."""
    from masq.analysis import peers as peer_analysis
    from masq.grid import tune
    from masq.runid import run_id
    from masq.store import load

    seeds = tune.held_count(cells, preset.tune_seeds, preset.tune_axes)
    known = stored = 0
    if holds_results(results):
        df = load(results)
        held = peer_analysis.held_configs(preset, cells, df)[0]
        ids = set() if df.empty else set(df["run_id"])
        known, stored = len(held), sum(1 for c in held if run_id(c) in ids)
    return (
        f"then {seeds} runs: the table runs of each λ sweep at the λ chosen on its "
        f"{_tuning_text(preset)} (λ known for {known} of them, {stored} stored)"
    )


def _tuning_text(preset: Any) -> str:
    """What a peer preset's sweeps choose λ on, in words."""
    seeds = f"{preset.tune_seeds} tuning seed(s)" if preset.tune_seeds else "seeds"
    if not preset.tune_axes:
        return seeds
    axes = ", ".join(f"{k} = {v}" for k, v in preset.tune_axes.items())
    return f"{seeds} run with {axes}"


# ----------------------------------------------------------------------------- table


def run_table(args: argparse.Namespace) -> int:
    """``masq table``."""
    from masq import report
    from masq.runtime import check_out_dir
    from masq.store import open_store

    open_store(args.results)  # a missing or foreign dir first, then where the table goes
    out = check_out_dir(args.out or args.results, "--out" if args.out else "--results (--out)")
    table = report.load_table(args.results, select_on=args.select_on, group_by=args.group_by)
    print(report.to_markdown(table, args.group_by), end="")
    try:
        md, csv = report.write_table(table, out, args.group_by)
    except OSError as err:
        print(f"masq: could not write the table into {out} ({error_text(err)}); it is complete "
              "above", file=sys.stderr)  # fmt: skip
        return 1
    print(f"written: {md}, {csv}")
    return 0


# ----------------------------------------------------------------------------- consistency


def run_consistency(args: argparse.Namespace) -> int:
    """``masq consistency``."""
    from masq import grid as search
    from masq import report
    from masq.config import RunConfig
    from masq.runid import run_id
    from masq.runtime import check_out_dir
    from masq.store import Store, load

    at_least_one(("--stack", args.stack))
    workers, threads = resolve_workers(args.workers, args.threads)
    df = load(args.results)
    if df.empty:
        raise ConfigError(f"no stored runs in {args.results!r}; run `masq grid` first")
    out = check_out_dir(args.out or Path(args.results) / "figures")
    Store(args.results).check_writable()  # the runs go into the results dir
    plan = report.consistency_plan(df, select_on=args.select_on, criterion=args.criterion)
    runs: dict[str, dict[str, str]] = {}
    configs = []
    for slt, labelled in plan.items():
        runs[slt] = {}
        for label, d in labelled.items():
            config = search.canonical(RunConfig.from_dict(d)).validate()
            runs[slt][label] = run_id(config)
            configs.append(config)
    summary = _execute("consistency", configs, args, workers, threads)
    if summary is None:
        return 1
    if summary.failed:
        print_failed(summary.failed, args.results)
        return 1
    print(report.consistency_summary(args.results, runs), end="")
    for path in report.consistency_figures(args.results, runs, out):
        print(f"written: {path}")
    return 0


# ----------------------------------------------------------------------------- migrate


def _register_migrate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate",
        help="convert a results directory of masq 0.1 (two-task records) in place",
        description="Rewrite every record of a format-1 results directory in format 2 (per-phase "
        "curves, accuracy matrix, ACC/BWT/forgetting); run ids and cached states stay. Safe to "
        "re-run after an interruption.",
    )
    p.add_argument("results", help="results directory")
    p.set_defaults(func=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    """``masq migrate``."""
    from masq.migrate import migrate

    count = migrate(args.results)
    print(f"{args.results}: {count} record(s) converted to format 2" if count else
          f"{args.results}: already format 2; nothing to do")  # fmt: skip
    return 0
