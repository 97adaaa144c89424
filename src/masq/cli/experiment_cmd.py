"""``masq run`` (one run of T tasks) and ``masq compare`` (the headline: one task-1 state,
every later phase run without EWC, with EWC+FIM and with EWC+MaSQ in both scales)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masq.cli.options import (
    add_run_flags,
    add_single_run_flags,
    check_consistent,
    given,
    hidden_from_tokens,
    shorthand_values,
    without_consolidation,
)
from masq.config import RunConfig, Scenario, hidden_text, lam_per_lr2
from masq.curves import task_name, union_name
from masq.defaults import PAPER_SLTS, paper_best, paper_best_text
from masq.errors import ConfigError
from masq.fileio import atomic_write, error_text, rescue, rescue_dir, save_png, warn
from masq.slt import parse_spec

if TYPE_CHECKING:
    from masq.protocol import Result

# The library (torch, pandas, matplotlib) is imported inside the functions that run: building
# the parser, and so `masq run --help`, loads none of it.
_PER_SLT = paper_best_text()
LR2_DEFAULT_HELP = (
    "per SLT: the paper's ε2 for its SLTs ("
    + ", ".join(f"{slt} {paper_best(slt)[1]:.0e}".replace("e-0", "e-") for slt in PAPER_SLTS)
    + "), lr1 for any other SLT; filled in by this command, not by RunConfig, so a run id "
    "holds the value used and a changed default never changes a stored run's id"
)
# The last task "ends near chance" below this multiple of chance accuracy (a warning).
NEAR_CHANCE = 1.5


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
            "lr2": LR2_DEFAULT_HELP,
            "lam": "1 / lr2, printed before training",
            "device": "auto",
        },
    )
    add_single_run_flags(p, curves=True)


def default_lr2(slt: str, lr1: float) -> float:
    """ε2 of a run whose ``--lr2`` is not given: the paper's for its SLTs (D5-5, D9-1,
    DP10-10: :func:`masq.defaults.paper_best`), ``lr1`` for every other SLT (split and
    permuted sequences learn nothing in short runs at the paper's 1e-5)."""
    return paper_best(slt)[1] if parse_spec(slt).text in PAPER_SLTS else lr1


def config_from_args(args: argparse.Namespace, **changes: Any) -> RunConfig:
    """The validated RunConfig of the parsed flags (per-SLT defaults filled in).

    Flags that contradict each other are refused (:func:`masq.cli.options.check_consistent`);
    a default gives way to a flag instead (EWC and online EWC): ``--importance none`` alone runs
    with λ = 0 and ``--lam 0`` alone with importance "none" (both printed and recorded as "no
    EWC").
    """
    from masq.consolidation import check_config, get_method

    compare = getattr(args, "command", "run") == "compare"
    values = without_consolidation(given(args), compare=compare)
    names = set(values)
    slt = parse_spec(values.get("slt", RunConfig().slt)).text
    for name, value in shorthand_values(args).items():
        values.setdefault(name, value)
    values["slt"] = slt
    values["hidden"] = (
        hidden_from_tokens(values["hidden"]) if "hidden" in values else paper_best(slt)[0]
    )
    values.setdefault("lr2", default_lr2(slt, values.get("lr1", RunConfig().lr1)))
    values.setdefault("device", "auto")
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
    from masq.report.runs import summary_writer
    from masq.runtime import check_out_dir, resolve_device, setup_threads

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
    from masq import protocol
    from masq.consolidation import method_label
    from masq.report import figures
    from masq.report.runs import accuracy_text, curves_csv, run_stem, write_tensorboard

    config = config_from_args(args)
    out = _prepare(args, config, "results/run")
    lam_note = lam_default_note(config, given(args))
    print(plan_text(config, method_label(config), lam_note), file=sys.stderr, flush=True)
    start = time.perf_counter()
    with quiet_stderr(args.quiet):
        result = protocol.run(config, progress=True, data_dir=args.data_dir)
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
        f"{config.slt} {label} λ={config.lam:g}{lam_note} lr2={config.lr2:g}: "
        f"best {union} {b[union]:.4f} (it {b['iteration']}), last {last[union]:.4f} "
        f"({tasks}) in {seconds:.0f} s"
    )
    if config.n_tasks > 2:
        print(accuracy_text(result))
    _warn_near_chance(config, last)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from masq import protocol
    from masq.consolidation import method_label
    from masq.report import figures
    from masq.report.runs import (
        compare_rows,
        csv_text,
        curves_csv,
        markdown_table,
        safe_name,
        text_table,
        write_tensorboard,
    )
    from masq.store import NotStored, Store

    base = config_from_args(args)
    out = _prepare(args, base, f"results/compare-{safe_name(base.slt)}")
    if (out / "meta.json").exists() or (out / "runs").exists():
        Store(out, create=False)  # --out is also a results directory: one of another kind fails
    lam_note = lam_default_note(base, given(args))
    methods = "no EWC, EWC+FIM, EWC+MaSQ (mean), (sum)"
    print(plan_text(base, methods, lam_note), file=sys.stderr, flush=True)
    start = time.perf_counter()
    with quiet_stderr(args.quiet):
        results = protocol.compare(base, progress=True, data_dir=args.data_dir)
    seconds = time.perf_counter() - start
    labelled = {method_label(r.config): r for r in results.values()}
    rows = compare_rows(labelled)
    try:
        store = Store(out)  # `masq table` and `masq report` read --out as a results directory
        for key, result in results.items():
            result.save(out / f"{key}.json")
            store.write_result(result)
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
    except (NotStored, ConfigError) as err:  # the store could not be written after all
        cause = err.__cause__ if isinstance(err.__cause__, OSError) else OSError(str(err))
        return rescue_results(args, results, out, cause)
    first = next(iter(results.values()))
    print(
        f"{base.slt}, hidden {hidden_text(base.hidden)}, lr1 {base.lr1:g}, "
        f"lr2 {base.lr2:g}, λ {base.lam:g}{lam_note}, {base.iters1}+{base.iters2} iterations, "
        f"seed {base.seed}; D1 accuracy after training {first.curves[0]['D1'][-1]:.4f}"
    )
    print(text_table(rows))
    written = "compare.md, compare.csv, compare.png" + (", curves.csv" if args.csv else "")
    print(f"{seconds:.0f} s in all; wrote {out}/{written}, *.json and the four runs as a results "
          f"directory (masq table --results {out}; masq report --results {out})")  # fmt: skip
    _warn_near_chance(base, results["none"].last)
    return 0


# ----------------------------------------------------------------------------- newcomer aids


def lam_default_note(config: RunConfig, names: Collection[str]) -> str:
    """ " (1 / lr2: --lam not given)" when λ was filled in as 1 / ε2, else ""."""
    from masq.importance import get_measure

    measure = get_measure(config.importance)
    filled = "lam" not in names and config.lam > 0 and measure.gives_importance
    return " (1 / lr2: --lam not given)" if filled else ""


def plan_text(config: RunConfig, label: str, lam_note: str) -> str:
    """The line printed before training: what runs, with the λ used (and whether it was a
    default), the learning rates and iterations of the phases."""
    from masq.consolidation import get_method

    later = "task 2" if config.n_tasks == 2 else f"tasks 2..{config.n_tasks}"
    weighted = "lam" in get_method(config.consolidation).fields  # IMM, joint: no λ to print
    lam = f", λ {config.lam:g}{lam_note}" if weighted else ""
    return (
        f"{config.slt}, hidden {hidden_text(config.hidden)}, {label}{lam}; "
        f"task 1: lr1 {config.lr1:g} × {config.iters1} iterations, {later}: lr2 "
        f"{config.lr2:g} × {config.iters2} each; seed {config.seed}"
    )


def chance_level(config: RunConfig) -> tuple[float, int]:
    """(chance accuracy, classes to choose from) on the last task: every output unit in the
    class scenario (one shared head), the task's own classes in the task scenario, the largest
    task's classes in the domain scenario (its shared head)."""
    classes = parse_spec(config.slt).task_classes
    if config.scenario == Scenario.TASK:
        k = len(classes[-1])
    elif config.scenario == Scenario.DOMAIN:
        k = max(len(c) for c in classes)
    elif config.scenario == Scenario.CLASS_BLOCKS and parse_spec(config.slt).permuted:
        k = sum(len(c) for c in classes)
    else:
        k = 1 + max(max(c) for c in classes)
    return 1.0 / k, k


def near_chance(config: RunConfig, last: Mapping[str, float]) -> str | None:
    """The warning when the last task ends below :data:`NEAR_CHANCE` × chance accuracy (it
    learned next to nothing: too few iterations or too small an ε2), else None."""
    chance, k = chance_level(config)
    name = task_name(config.n_tasks - 1)
    acc = float(last.get(name, float("nan")))
    if k < 2 or not acc < NEAR_CHANCE * chance:
        return None
    return (
        f"the last task {name} ends at {100 * acc:.1f} % test accuracy, near chance "
        f"({100 * chance:.0f} % with {k} classes to choose from): it learned next to nothing; "
        f"give more iterations (--iters2, now {config.iters2}) or a larger --lr2 (now "
        f"{config.lr2:g})"
    )


def _warn_near_chance(config: RunConfig, last: Mapping[str, float]) -> None:
    message = near_chance(config, last)
    if message:
        warn(message)


class PhaseLines(io.TextIOBase):
    """A stderr for ``--quiet``: a progress bar (drawn after a carriage return, again and
    again) reaches ``stream`` only as its last state, one line when it ends, i.e. one line per
    phase; every other line (warnings, errors) passes through as it is."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        self.bar: str | None = None  # the bar being drawn, if one is
        self.other = ""  # the unfinished line of other output

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """The wrapped stream's (progress bars draw with it)."""
        return str(getattr(self.stream, "encoding", None) or "utf-8")

    def writable(self) -> bool:
        """Always: a text sink."""
        return True

    def write(self, text: str) -> int:
        """A bar's drawing (it starts with a carriage return) replaces the bar, whose end (a
        newline) passes its last state on; other text passes on line by line."""
        if text.startswith("\r") or (self.bar is not None and not text.strip()):
            for part in re.split(r"(\r|\n)", text):
                if part == "\r":
                    self.bar = ""
                elif part == "\n":
                    self._line(self.bar or "")
                    self.bar = None
                elif self.bar is not None:
                    self.bar += part
        else:
            *lines, self.other = (self.other + text).split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if line.strip():
            self.stream.write(line.rstrip() + "\n")
            self.stream.flush()


@contextlib.contextmanager
def quiet_stderr(quiet: bool) -> Iterator[None]:
    """With ``quiet``, stderr is :class:`PhaseLines` of itself inside the block."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stderr(PhaseLines(sys.stderr)):
        yield
