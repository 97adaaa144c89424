"""``masq analyze diagonality | compare | lambda | kfac``: the analyses as commands.

masq analyze diagonality --out docs/analysis             # Table 2, all six tensors; heat maps
masq analyze compare --results runs/paper --out docs/analysis   # FIM vs MaSQ at the winners
masq analyze compare --slt D5-5 D9-1 DP10-10 --out docs/analysis  # ... at freshly trained states
masq analyze lambda --slt D5-5 --results runs/lambda     # the λ sweep (a resumable grid)
masq analyze lambda --slt D5-5 D9-1 DP10-10 --seeds 3 --dry-run   # its size and time
masq analyze kfac --slt D5-5 --hidden 30-30 --seeds 5 --results runs/kfac   # diagonal vs K-FAC

Each writes its tables (Markdown, CSV), figures (PNG) and a manifest ``<name>.json`` (what
ran, where, when, the command) into its output directory; ``masq report`` reads them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from masq.cli import analyze_kfac
from masq.cli.analyze_common import (
    MEASURE_FIELDS,
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
from masq.cli.options import add_execution_flags, add_process_flags
from masq.config import FIELD, Init, RunConfig, hidden_text
from masq.defaults import PAPER_SLTS, paper_best
from masq.errors import ConfigError
from masq.runtime import check_out_dir, setup_threads

DEFAULT_OUT = "results/analysis"
_PAPER = " ".join(PAPER_SLTS)  # "D5-5 D9-1 DP10-10" for help texts


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``analyze`` (with ``diagonality``, ``compare``, ``lambda`` and ``kfac``) to ``sub``."""
    p = sub.add_parser(
        "analyze",
        help="the paper's analyses: Fisher diagonality, FIM vs MaSQ, λ sweeps",
        description="The paper's analyses (its sections 5.3, 5.4) and the λ sweep; each "
        "writes Markdown, CSV, PNG and a manifest that `masq report` reads.",
    )

    def show_help(args: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=show_help)
    inner = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    _register_diagonality(inner)
    _register_compare(inner)
    _register_lambda(inner)
    analyze_kfac.register(inner)


def _training(
    p: argparse.ArgumentParser, iters_flag: str, iters_default: int, hidden_default: str
) -> None:
    g = p.add_argument_group("task-1 training")
    g.add_argument("--hidden", nargs="+", default=None, metavar="N",
                   help=f"hidden sizes, e.g. 800-800 (default: {hidden_default})")  # fmt: skip
    add = g.add_argument
    add(iters_flag, dest="iters1", type=int, default=iters_default, metavar="N",
        help=f"iterations on task 1 (default: {iters_default})")  # fmt: skip
    add("--seed", type=int, default=0, help="seed of every random stream (default: 0)")
    add("--init", choices=Init.values(), default="torch", help="initialization (default: torch)")
    add("--lr1", type=float, default=FIELD["lr1"].default, help="task-1 learning rate (1e-3)")
    add("--batch-size", type=int, default=FIELD["batch_size"].default, help="batch size (100)")


def _register_diagonality(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "diagonality",
        help="Table 2: full Fisher-block statistics of every weight matrix and bias vector",
        description="Train a net on task 1 (or load a state), then compute for every weight "
        "matrix and bias vector the statistics of its full empirical Fisher block over task 1's "
        "training data (diagonal and off-diagonal sums and means, absolute values, ratios); "
        "write Table 2 (table2.md, table2.csv), heat maps of the last weight matrix's and the "
        "output bias's blocks (fisher_blocks.png) and diagonality.json.",
    )
    p.add_argument("--slt", default="D5-5", help="SLT whose task 1 is used (default: D5-5)")
    _training(p, "--iters", 5000, "30-30")
    p.set_defaults(hidden_default=(30, 30))
    add = p.add_argument
    add("--samples", type=int, default=0, help="first N samples of task 1 (default 0: all)")
    add("--state", default=None, metavar="FILE",
        help="a trained task-1 state instead of training: a results dir's d1/*.pt, or a "
        "saved state dict (.pt, .safetensors) of the --hidden net")  # fmt: skip
    add("--tensors", nargs="+", default=None, metavar="NAME", help="only these (default: all)")
    add("--max-exact", type=int, default=25_000, metavar="P",
        help="exact up to P parameters, estimated above (default: 25000)")  # fmt: skip
    add_process_flags(p, out_help=f"output dir ({DEFAULT_OUT})")
    p.set_defaults(func=run_diagonality)


def _register_compare(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="FIM versus MaSQ per tensor at trained task-1 states",
        description="At each SLT's task-1 state (the Table-1 winner of --results, its state "
        "from the results dir's cache, else trained from flags): per tensor the maxima of the "
        "FIM (true, sampled, exact labels) and of MaSQ (mean, sum), the ratio of their means, "
        "their Spearman rank correlation, the overlap of their top-q entries and the share of "
        "the FIM's top-q entries whose MaSQ (sum scale) is below R x FIM (per-sample gradients "
        "that cancel more than chance, whose level is MaSQ sum = FIM). Writes "
        "compare.md, compare.csv, compare_maxima.png and compare.json.",
    )
    add = p.add_argument
    add("--results", default=None, metavar="DIR", help="use each SLT's Table-1 winner of DIR")
    add("--criterion", choices=("best", "last"), default="best", help="winner's criterion")
    add("--select-on", choices=("test", "val"), default="test", help="winner selected on")
    add("--slt", nargs="+", default=None, help=f"SLTs to train (default: {_PAPER})")
    _training(p, "--iters1", FIELD["iters1"].default, "each SLT's paper-best")
    add("--masq-batch", type=int, default=FIELD["masq_batch"].default, help="B_MaSQ (1000)")
    add("--top", type=float, default=0.01, help="fraction q of top entries (default: 0.01)")
    add("--cancel-below", type=float, default=0.1, metavar="R",
        help="cancelling: MaSQ (sum) below R x FIM (default: 0.1)")  # fmt: skip
    add_process_flags(p, out_help=f"output dir ({DEFAULT_OUT})")
    p.set_defaults(func=run_compare)


def _register_lambda(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lambda",
        help="the λ sweep: best and last accuracy against λ for FIM, MaSQ mean and MaSQ sum "
        "(or any measures)",
        description="For each SLT (at its paper-best architecture and ε2 unless given), re-train "
        "on the later tasks from one task-1 state with EWC at λ from --lam-min to --lam-max "
        "(--per-decade points per decade) with each of --measures (default: FIM, MaSQ mean and "
        "MaSQ sum), plus λ = 0; a grid, so it shares task 1, stacks the re-training and "
        "resumes. Writes lambda_<SLT>.png, lambda.md, lambda.csv, lambda_needed.md/.csv and "
        "lambda.json.",
    )
    add = p.add_argument
    add("--slt", nargs="+", default=list(PAPER_SLTS), help=f"SLTs (default: {_PAPER})")
    add("--hidden", nargs="+", default=None, metavar="N", help="net (default: paper-best)")
    add("--lr2", type=float, default=None, help="ε2 for every SLT (default: paper-best)")
    add("--seeds", type=int, default=1, help="seeds 0..N-1 (bands; default: 1)")
    add("--measures", nargs="+", default=["fisher", "masq"], metavar="M",
        help="importance measures swept (default: fisher masq; MaSQ in both scales)")  # fmt: skip
    add_lam_flags(add, (*SWEEP_FIELDS, *MEASURE_FIELDS), per_decade=2)
    add("--tolerance", type=float, default=0.01, help="'λ needed' range tolerance (0.01)")
    add("--results", default="results/lambda", metavar="DIR", help="the sweep's results dir")
    add("--out", default=None, metavar="DIR", help="tables, figures (default: the results dir)")
    add("--dry-run", action="store_true", help="print the runs and a time estimate; run nothing")
    add_execution_flags(p)
    p.set_defaults(func=run_lambda)


# ----------------------------------------------------------------------------- helpers


def _first_config(args: argparse.Namespace, slt: str, hidden: tuple[int, ...]) -> RunConfig:
    """The config of a task-1 training from the shared flags (later-phase fields at defaults)."""
    values: dict[str, Any] = {"slt": slt, "hidden": hidden, "init": args.init, "seed": args.seed,
                              "lr1": args.lr1, "batch_size": args.batch_size,
                              "iters1": args.iters1}  # fmt: skip
    if getattr(args, "masq_batch", None) is not None:
        values["masq_batch"] = args.masq_batch
    return RunConfig().with_(**values).validate()


def _load_state(path: str) -> tuple[dict[str, Any], RunConfig | None]:
    """(state dict, its config when the file holds one) from a results dir's d1/*.pt, a saved
    state dict (.pt) or a .safetensors file."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--state {path!r}: no such file; give a d1/*.pt of a results dir")
    try:
        if p.suffix == ".safetensors":
            from masq.protocol import load_weights

            return dict(load_weights(p)), None
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file
        raise ConfigError(
            f"--state {path!r}: unreadable ({type(err).__name__}); give a d1/*.pt of a results "
            "dir or a saved state dict"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        config = RunConfig.from_dict(obj["config"]) if "config" in obj else None
        return dict(obj["state_dict"]), config
    if isinstance(obj, dict):
        return dict(obj), None
    raise ConfigError(f"--state {path!r}: not a state dict; give a d1/*.pt of a results dir")


# ----------------------------------------------------------------------------- diagonality


def run_diagonality(args: argparse.Namespace) -> int:
    """``masq analyze diagonality``."""
    from masq import analysis

    setup_threads(args.threads)
    if args.max_exact < 0:
        raise ConfigError(f"--max-exact must be >= 0, got {args.max_exact}")
    if args.samples < 0:
        raise ConfigError(f"--samples must be >= 0 (0: all), got {args.samples}")
    config = _first_config(args, slt_text(args.slt), hidden_of(args.hidden, args.hidden_default))
    state = None
    if args.state is not None:
        state, stored = _load_state(args.state)
        if stored is not None and args.hidden is None:
            config = stored.with_(device="cpu")
    out = check_out_dir(args.out or DEFAULT_OUT)
    arch = f"784-{hidden_text(config.hidden)}-10"
    print(f"diagonality: {'loaded' if state else 'training'} {arch} on D1 of {config.slt}")
    start = time.perf_counter()
    result = analysis.diagonality(
        config, state=state, samples=args.samples, names=args.tensors,
        max_exact_params=args.max_exact, data_dir=args.data_dir, state_source=args.state,
        progress=lambda name, s: print(f"  {name}: {s:.1f} s", flush=True),
    )  # fmt: skip
    total = time.perf_counter() - start
    words = ["masq", "analyze", "diagonality", "--slt", config.slt, "--hidden",
             hidden_text(config.hidden), "--iters", config.iters1, "--seed", config.seed,
             "--init", config.init, "--samples", args.samples]  # fmt: skip
    words += ["--state", args.state] if args.state else []
    words += ["--tensors", *args.tensors] if args.tensors else []
    words += ["--max-exact", args.max_exact, "--out", out]
    md, written = analysis.diagonality_outputs(
        result, out, command=command_text(words), total_seconds=total
    )
    print(md, end="")
    print(f"task-1 accuracy on these samples {result.train_accuracy:.4f}; training "
          f"{result.train_seconds:.1f} s, statistics {result.seconds:.1f} s, "
          f"in all {total:.1f} s")  # fmt: skip
    print_written(written)
    return 0


# ----------------------------------------------------------------------------- compare


def _winner_configs(root: str, criterion: str, select_on: str) -> list[RunConfig]:
    """Each SLT's Table-1 winner (``criterion``) of results dir ``root``, its lowest seed."""
    from masq import report
    from masq.store import load, load_record

    df = load(root)
    if df.empty:
        raise ConfigError(f"no stored runs in {root!r}; run `masq grid --results {root}` first")
    table = report.table1(df, select_on=select_on)
    configs = []
    for _, row in table[table["criterion"] == criterion].iterrows():
        ids = str(row["run_ids"]).split(",")
        rid = df[df["run_id"].isin(ids)].sort_values(["seed", "run_id"])["run_id"].iloc[0]
        configs.append(RunConfig.from_dict(load_record(root, rid)["result"]["config"]))
    return configs


def run_compare(args: argparse.Namespace) -> int:
    """``masq analyze compare``."""
    from masq import analysis, grid, protocol
    from masq.store import Store

    setup_threads(args.threads)
    if not 0 < args.top <= 1:
        raise ConfigError(f"--top must lie in (0, 1], got {args.top}")
    if not args.cancel_below > 0:
        raise ConfigError(f"--cancel-below must be > 0, got {args.cancel_below}")
    store = None
    if args.results is not None:
        if args.slt is not None or args.hidden is not None:
            raise ConfigError("give either --results DIR or --slt/--hidden, not both")
        configs = _winner_configs(args.results, args.criterion, args.select_on)
        store = Store(args.results, create=False)
        words = ["masq", "analyze", "compare", "--results", args.results,
                 "--criterion", args.criterion, "--select-on", args.select_on]  # fmt: skip
    else:
        slts = [slt_text(s) for s in (args.slt or PAPER_SLTS)]
        configs = []
        for slt in slts:
            default = paper_best(slt)[0]
            configs.append(_first_config(args, slt, hidden_of(args.hidden, default)))
        words = ["masq", "analyze", "compare", "--slt", *slts]
        words += ["--hidden", *args.hidden] if args.hidden else []
        words += ["--iters1", args.iters1, "--seed", args.seed, "--init", args.init,
                  "--masq-batch", args.masq_batch]  # fmt: skip
    out = check_out_dir(args.out or DEFAULT_OUT)
    words += ["--top", args.top, "--cancel-below", args.cancel_below, "--out", out]
    rows: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []
    start = time.perf_counter()
    for config in (c.with_(device="cpu") for c in configs):
        tasks = protocol.make_tasks(config, data_dir=args.data_dir)
        t0 = time.perf_counter()
        if store is not None:  # the grid's cached task-1 state (trained and cached if absent)
            d1, trained = grid.load_or_train_d1(store, config, tasks)
        else:
            d1, trained = protocol.train_first(config, tasks), True
        train_s = time.perf_counter() - t0
        result = analysis.compare_state(
            config, d1.state_dict, tasks, top=args.top, cancel_below=args.cancel_below
        )
        rows += result.rows
        states.append({"slt": config.slt, "config": config.to_dict(), "trained_now": trained,
                       "train_seconds": train_s, "samples": result.samples,
                       "importance_seconds": result.seconds["importance"]})  # fmt: skip
        print(f"  {config.slt} 784-{hidden_text(config.hidden)}-10: task 1 "
              f"{'trained' if trained else 'from the cache'} ({train_s:.0f} s), five importance "
              f"passes {result.seconds['importance']:.1f} s", flush=True)  # fmt: skip
    total = time.perf_counter() - start
    title = (
        f"FIM versus MaSQ per tensor at the task-1 states (B_MaSQ = {configs[0].masq_batch}; "
        f"top-q with q = {args.top:g}; cancelling: MaSQ sum < {args.cancel_below:g} × FIM)"
    )
    body = {"command": command_text(words), "states": states, "top": args.top,
            "cancel_below": args.cancel_below, "seconds": {"total": total}}  # fmt: skip
    md, written = analysis.compare_outputs(rows, out, title=title, body=body)
    print(md, end="")
    print(f"{total:.0f} s in all")
    print_written(written)
    return 0


# ----------------------------------------------------------------------------- lambda


def run_lambda(args: argparse.Namespace) -> int:
    """``masq analyze lambda``."""
    from masq import analysis
    from masq.runid import run_id
    from masq.store import load

    lams = analysis.lam_grid(args.lam_min, args.lam_max, args.per_decade)
    at_least_one(("--seeds", args.seeds), ("--stack", args.stack))
    if not 0 <= args.tolerance < 1:
        raise ConfigError(f"--tolerance must lie in [0, 1), got {args.tolerance}")
    fields = (*SWEEP_FIELDS, *MEASURE_FIELDS)
    base = {n: getattr(args, n) for n in fields if getattr(args, n) is not None}
    grids = []
    for slt in [slt_text(s) for s in args.slt]:
        hidden_d, lr2_d = paper_best(slt)
        lr2 = lr2_d if args.lr2 is None else args.lr2
        hidden = hidden_of(args.hidden, hidden_d)
        grids.append(
            analysis.sweep_grid(
                slt, hidden, lr2, lams, seeds=args.seeds, base=base, measures=args.measures
            )
        )
    configs = analysis.sweep_configs(grids)
    from masq.consolidation import method_label

    n_imp = len({method_label(c) for c in configs if c.lam > 0})
    workers, threads = resolve_workers(args.workers, args.threads, args.device)
    print(f"λ sweep: {len(configs)} runs ({len(grids)} SLT(s) × {args.seeds} seed(s) × (λ = 0 + "
          f"{len(lams)} λ from {lams[0]:g} to {lams[-1]:g} × {n_imp} importances))")  # fmt: skip
    if args.dry_run:
        print_plan(configs, args.results, stack=args.stack, workers=workers, threads=threads)
        return 0
    summary = execute("analyze lambda", configs, args.results, workers=workers,
                      stack=args.stack, threads=threads, progress=not args.no_progress,
                      tasks_fn=tasks_fn(args.data_dir))  # fmt: skip
    if summary is None:
        return 1
    print(f"{done_text(summary)}; {summary.seconds:.0f} s")
    if summary.failed:
        print_failed(summary.failed, args.results)
        return 1
    ids = {run_id(c) for c in configs}
    df = load(args.results)
    frame = analysis.sweep_frame(df[df["run_id"].isin(ids)])
    out = check_out_dir(args.out or args.results)
    words = ["masq", "analyze", "lambda", "--slt", *[g.slt[0] for g in grids]]
    words += ["--hidden", *args.hidden] if args.hidden else []
    words += ["--lr2", args.lr2] if args.lr2 is not None else []
    words += ["--seeds", args.seeds]
    for name, value in base.items():
        words += [FIELD[name].flag, value]
    words += ["--lam-min", args.lam_min, "--lam-max", args.lam_max, "--per-decade",
              args.per_decade, "--tolerance", args.tolerance,
              "--results", args.results]  # fmt: skip
    words += ["--out", args.out] if args.out else []
    slts = [{"slt": g.slt[0], "hidden": hidden_text(g.hidden[0]), "lr2": g.lr2[0]} for g in grids]
    body = {"command": command_text(words), "slts": slts, "seeds": args.seeds, "lams": lams,
            "config": {k: str(v) for k, v in base.items()}, "runs": len(configs),
            "results": str(args.results), "precision": str(configs[0].precision),
            "seconds": {"grid": summary.seconds}, "runs_now": summary.done}  # fmt: skip
    md, written = analysis.sweep_outputs(frame, out, tolerance=args.tolerance, body=body)
    print(md, end="")
    print_written(written)
    return 0
