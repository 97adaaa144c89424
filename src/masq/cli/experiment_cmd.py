"""``masq run`` (one run of T tasks) and ``masq compare`` (the headline: one task-1 state,
every later phase run without EWC, with EWC+FIM and with EWC+MaSQ in both scales)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from masq import protocol
from masq.cli.options import (
    add_run_flags,
    add_single_run_flags,
    check_consistent,
    given,
    hidden_from_tokens,
)
from masq.config import RunConfig, hidden_text, lam_per_lr2
from masq.consolidation import check_config, get_method, method_label
from masq.curves import task_name, union_name
from masq.defaults import paper_best, paper_best_text
from masq.fileio import atomic_write, error_text, rescue, rescue_dir, save_png
from masq.protocol import Result
from masq.report import figures
from masq.report.runs import (
    accuracy_text,
    compare_rows,
    csv_text,
    curves_csv,
    markdown_table,
    run_stem,
    safe_name,
    summary_writer,
    text_table,
    write_tensorboard,
)
from masq.runtime import check_out_dir, resolve_device, setup_threads
from masq.slt import parse_spec

_PER_SLT = paper_best_text()


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run`` and ``compare`` to ``sub``."""
    run = sub.add_parser(
        "run",
        help="one run: train task 1, then each later task with EWC (FIM, MaSQ or none)",
        description=(
            "Train on task 1, compute its importance (FIM, MaSQ or none) on its training data, "
            "train each later task with the EWC penalty of the tasks before it; print a "
            "summary and write the JSON record, a figure of the curves and (T > 2) a heat map "
            "of the accuracy matrix into --out."
        ),
    )
    _knobs(run)
    run.add_argument(
        "--save-weights",
        action="store_true",
        help="also write the weights at the end of every phase (safetensors) into --out",
    )
    run.set_defaults(func=_run)

    compare = sub.add_parser(
        "compare",
        help="the headline: one task-1 state continued four ways (no EWC, FIM, MaSQ mean/sum)",
        description=(
            "Train task 1 once, compute FIM and MaSQ (scale mean and sum) from that one state "
            "and run the later tasks from it four ways: no EWC, EWC+FIM, EWC+MaSQ (mean), "
            "EWC+MaSQ (sum). Prints a side-by-side table and writes compare.md, compare.csv, "
            "compare.png and the four JSON records into --out."
        ),
    )
    _knobs(compare, skip=("importance", "scale"))
    compare.set_defaults(func=_compare)


def _knobs(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    add_run_flags(
        p,
        skip=skip,
        defaults={
            "hidden": f"per SLT; {_PER_SLT}",
            "lr2": "per SLT",
            "lam": "1 / lr2",
            "device": "auto",
        },
    )
    add_single_run_flags(p, curves=True)


def config_from_args(args: argparse.Namespace, **changes: Any) -> RunConfig:
    """The validated RunConfig of the parsed flags (per-SLT defaults filled in).

    Flags that contradict each other are refused (:func:`masq.cli.options.check_consistent`);
    a default gives way to a flag instead (EWC and online EWC): ``--importance none`` alone runs
    with λ = 0 and ``--lam 0`` alone with importance "none" (both printed and recorded as "no
    EWC").
    """
    values = given(args)
    names = set(values)
    compare = getattr(args, "command", "run") == "compare"
    slt = parse_spec(values.get("slt", RunConfig().slt)).text
    default_hidden, default_lr2 = paper_best(slt)
    values["slt"] = slt
    values["hidden"] = (
        hidden_from_tokens(values["hidden"]) if "hidden" in values else default_hidden
    )
    values.setdefault("lr2", default_lr2)
    values.setdefault("device", "auto")
    if args.iters is not None:
        values.setdefault("iters1", args.iters)
        values.setdefault("iters2", args.iters)
    # methods that read λ (EWC and online EWC, or one of yours): λ = 0 means no consolidation
    ewc_family = "lam" in get_method(values.get("consolidation", "ewc")).fields
    if "lam" not in values and ewc_family and values.get("importance") == "none":
        values["lam"] = 0.0  # no EWC: not λ = 1 / lr2 printed beside "no EWC"
    elif "lam" not in values:
        lr2 = values["lr2"]
        ok = isinstance(lr2, float) and lr2 > 0 and lr2 != float("inf")
        values["lam"] = lam_per_lr2(1.0, lr2) if ok else 0.0  # a bad lr2 is reported below
    elif values["lam"] == 0 and ewc_family and "importance" not in values and not compare:
        values["importance"] = "none"  # --lam 0: no importance pass, no EWC
    config = check_config(RunConfig().with_(**values).with_(**changes))
    check_consistent(config, names, compare=compare)
    return config


def _prepare(args: argparse.Namespace, config: RunConfig, default_out: str) -> Path:
    """Everything that can fail on input, before any training: threads, device, extras, and
    every output directory created and proven writable."""
    setup_threads(args.threads)
    resolve_device(config.device)
    if args.tensorboard is not None:
        summary_writer()
        check_out_dir(args.tensorboard, "--tensorboard")
    return check_out_dir(args.out or default_out)


def rescue_results(
    args: argparse.Namespace, results: Mapping[str, Result], out: Path, err: OSError
) -> int:
    """Finished ``results`` whose outputs could not be written into ``out`` (checked writable
    before training, so e.g. a full disk): their JSON records (and weights with
    ``--save-weights``) go to :func:`masq.fileio.rescue_dir` of ``out``, one line on stderr
    says where and why; the records themselves on stdout if even that fails. Exit status 1."""
    why = error_text(err) + (f" at {err.filename}" if err.filename else "")
    try:
        for name, result in results.items():
            rescue(out, f"{name}.json", result.to_json() + "\n")
            if getattr(args, "save_weights", False) and result.weights is not None:
                result.save_weights(rescue_dir(out), name)
    except OSError as again:
        print(f"masq: could not write into {out} ({why}) nor into {rescue_dir(out)} "
              f"({error_text(again)}); the finished records follow on stdout",
              file=sys.stderr)  # fmt: skip
        for result in results.values():
            print(result.to_json())
        return 1
    print(f"masq: could not write into {out} ({why}); the finished result was saved to "
          f"{rescue_dir(out)} instead", file=sys.stderr)  # fmt: skip
    return 1


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = _prepare(args, config, "results/run")
    start = time.perf_counter()
    result = protocol.run(config, progress=not args.quiet, data_dir=args.data_dir)
    seconds = time.perf_counter() - start
    stem = run_stem(config)
    label = method_label(config)
    try:
        written = [result.save(out / f"{stem}.json")]
        written.append(figures.plot_results({label: result}, out / f"{stem}.png"))
        if config.n_tasks > 2:
            fig = figures.accuracy_figure(result)
            written.append(save_png(fig, out / f"{stem}_accuracy.png", dpi=figures.FIGURE_DPI))
        if args.save_weights:
            written += result.save_weights(out, stem)
        if args.csv:
            written.append(atomic_write(out / f"{stem}.csv", curves_csv({stem: result})))
        if args.tensorboard is not None:
            write_tensorboard({stem: result}, Path(args.tensorboard))
    except OSError as err:  # never lose a finished run
        return rescue_results(args, {stem: result}, out, err)
    union = union_name(config.n_tasks)
    b, last = result.best, result.last
    tasks = ", ".join(f"{task_name(j)} {last[task_name(j)]:.4f}" for j in range(config.n_tasks))
    print(
        f"{config.slt} {label} λ={config.lam:g} lr2={config.lr2:g}: "
        f"best {union} {b[union]:.4f} (it {b['iteration']}), last {last[union]:.4f} "
        f"({tasks}) in {seconds:.0f} s"
    )
    if config.n_tasks > 2:
        print(accuracy_text(result))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    base = config_from_args(args)
    out = _prepare(args, base, f"results/compare-{safe_name(base.slt)}")
    start = time.perf_counter()
    results = protocol.compare(base, progress=not args.quiet, data_dir=args.data_dir)
    seconds = time.perf_counter() - start
    labelled = {method_label(r.config): r for r in results.values()}
    rows = compare_rows(labelled)
    try:
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
    except OSError as err:  # never lose finished runs
        return rescue_results(args, results, out, err)
    first = next(iter(results.values()))
    print(
        f"{base.slt}, hidden {hidden_text(base.hidden)}, lr1 {base.lr1:g}, "
        f"lr2 {base.lr2:g}, λ {base.lam:g}, {base.iters1}+{base.iters2} iterations, "
        f"seed {base.seed}; D1 accuracy after training {first.curves[0]['D1'][-1]:.4f}"
    )
    print(text_table(rows))
    print(f"{seconds:.0f} s in all; wrote {out}/compare.md, compare.csv, compare.png, *.json")
    return 0
