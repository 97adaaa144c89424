"""The ``masq`` command line: the only place that parses strings.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; the parsed namespace carries ``func(args) -> int``.
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
from collections.abc import Sequence
from types import FrameType

from masq import __version__
from masq.cli.waitpolicy import wait_policy_env
from masq.errors import MasqError
from masq.fileio import error_text

# The sub-command modules, in the order of ``masq --help``; imported when the parser is built
# (they load torch), so that :func:`main` can set the thread settings first.
COMMANDS: tuple[str, ...] = (
    "data_cmd",
    "experiment_cmd",
    "grid_cmd",
    "analyze_cmd",
    "report_cmd",
    "imm_cmd",
    "table1_cmd",
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread and handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends at once
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="masq",
        description="EWC with the diagonal Fisher or MaSQ: reproduce Gepperth & Wiech and beyond.",
    )
    parser.add_argument("--version", action="version", version=f"masq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"masq.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``masq`` console script; returns the exit status. Before anything
    loads torch (and its OpenMP runtime) it sets ``OMP_WAIT_POLICY=PASSIVE`` on an
    oversubscribed machine unless the environment chose a policy
    (:func:`masq.cli.waitpolicy.wait_policy_env`); importing :mod:`masq.cli` changes nothing."""
    os.environ.update(wait_policy_env())
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
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
