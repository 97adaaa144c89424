"""The ``masq`` command line: the only place that parses strings.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; the parsed namespace carries ``func(args) -> int``. Only the module
of the command named on the command line is imported (:data:`COMMANDS`), and the modules
import torch, pandas and matplotlib inside the functions that run, so ``masq --help`` and a
command's ``--help`` start at once (``benchmarks/cli_startup.py``).
Errors caused by the user (:class:`masq.errors.MasqError`) print one line and
exit with status 2; Ctrl-C exits with 130 and SIGTERM with 143, both without a traceback
and with nothing half-written (every write is atomic; a grid's workers are terminated); a
file-system error no check could foresee prints one line and exits with 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Collection, Sequence
from types import FrameType

from masq import __version__
from masq.cli.waitpolicy import wait_policy_env
from masq.errors import MasqError
from masq.fileio import error_text
from masq.plugins import ENV as PLUGINS_ENV

# Every sub-command in the order of ``masq --help``: (name, module of this package that
# registers it, its one-line help). A module is imported only when its command runs (the
# modules load torch, pandas or matplotlib), so that ``masq --help`` starts at once and
# :func:`main` can set the thread settings first; ``tests/test_newcomer.py`` checks that each
# help here is the one its module registers.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("data", "data_cmd", "fetch and describe the datasets (MNIST, Fashion-MNIST)"),
    ("run", "experiment_cmd",
     "one run: train task 1, then each later task with EWC (FIM, MaSQ or none)"),
    ("compare", "experiment_cmd",
     "the headline: one task-1 state continued four ways (no EWC, FIM, MaSQ mean/sum)"),
    ("grid", "grid_cmd", "run an exhaustive grid of experiments (resumable)"),
    ("table", "grid_cmd", "the paper's Table 1 from stored results"),
    ("consistency", "grid_cmd",
     "re-run each SLT's best configuration with FIM and without EWC; figures"),
    ("migrate", "grid_cmd", "convert a results directory of masq 0.1 (two-task records) in place"),
    ("analyze", "analyze_cmd", "the paper's analyses: Fisher diagonality, FIM vs MaSQ, λ sweeps"),
    ("report", "report_cmd", "one static HTML report (and Markdown) of results and analyses"),
    ("imm", "imm_cmd",
     "Incremental Moment Matching: train on, then merge (mean-IMM and mode-IMM) over α"),
    ("imm-report", "imm_cmd",
     "figures of accuracy against α for the IMM runs of a results directory"),
    ("table1", "table1_cmd",
     "Table 1, settled: ε2 × λ planes, extension, confirmation on fresh seeds, tests"),
    ("export", "table1_cmd",
     "every valid run record of a results dir into one .jsonl.gz (deterministic)"),
    ("import", "table1_cmd", "restore the run records of a .jsonl.gz into a results dir"),
    ("peers", "peers_cmd", "a published table beside ours (its runs: masq grid --preset NAME)"),
)  # fmt: skip
MODULES: tuple[str, ...] = tuple(dict.fromkeys(module for _, module, _ in COMMANDS))


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named by ``argv`` (its first token that is not an option), or None."""
    first = next((token for token in argv if not token.startswith("-")), None)
    return first if any(first == name for name, _, _ in COMMANDS) else None


def split_plugins(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the modules of the leading ``--plugin MODULE`` / ``--plugin=MODULE`` options, the rest
    of ``argv``): plugins come before the command, as every top-level option."""
    plugins: list[str] = []
    rest = list(argv)
    while rest:
        if rest[0] == "--plugin" and len(rest) > 1:
            plugins.append(rest[1])
            rest = rest[2:]
        elif rest[0].startswith("--plugin="):
            plugins.append(rest[0].split("=", 1)[1])
            rest = rest[1:]
        else:
            break
    return plugins, rest


def modules_for(argv: Sequence[str]) -> tuple[str, ...]:
    """The command modules that parsing ``argv`` needs: the one of its sub-command (none for
    ``masq --help``, ``masq --version`` or an unknown command)."""
    command = command_of(argv)
    return tuple(module for name, module, _ in COMMANDS if name == command)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread and handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends at once
    raise Terminated


def build_parser(modules: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser, with one sub-parser per command: complete for the commands of
    ``modules`` (default: every module), a placeholder carrying only the one-line help for the
    others (enough for ``masq --help``; none of their modules is imported)."""
    parser = argparse.ArgumentParser(
        prog="masq",
        description="EWC with the diagonal Fisher or MaSQ: reproduce Gepperth & Wiech and beyond.",
    )
    parser.add_argument("--version", action="version", version=f"masq {__version__}")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it registers a measure, method or penalty kind of your own), "
        "here and in every worker of a grid; repeatable; also MASQ_PLUGINS=MODULE[,MODULE]",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    load = set(MODULES if modules is None else modules)
    for name, module, text in COMMANDS:
        if module not in load:
            sub.add_parser(name, help=text, add_help=False)
        elif name not in sub.choices:  # the module registers all its commands, in this order
            importlib.import_module(f"masq.cli.{module}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``masq`` console script; returns the exit status. Before anything
    loads torch (and its OpenMP runtime) it sets ``OMP_WAIT_POLICY=PASSIVE`` on an
    oversubscribed machine unless the environment chose a policy
    (:func:`masq.cli.waitpolicy.wait_policy_env`); importing :mod:`masq.cli` changes nothing."""
    os.environ.update(wait_policy_env())
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins, rest = split_plugins(argv)
    parser = build_parser(modules_for(rest))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if plugins or os.environ.get(PLUGINS_ENV):
            from masq.plugins import load_from_env, load_plugins

            load_from_env()
            load_plugins(plugins)
        args = parser.parse_args(argv)
        if getattr(args, "compile_step", False):  # read by the stacked engine, in every worker
            from masq.runtime import COMPILE_ENV

            os.environ[COMPILE_ENV] = "1"
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except MasqError as err:
        print(f"masq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"masq: {what}; nothing half-written was kept (re-run to resume).", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except OSError as err:  # e.g. the disk filled up after every check passed
        where = f" ({err.filename})" if err.filename else ""
        print(f"masq: error: {error_text(err)}{where}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
