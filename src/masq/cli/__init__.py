"""The ``masq`` command line: the only place that parses strings.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; the parsed namespace carries ``func(args) -> int``.
Errors caused by the user (:class:`masq.errors.MasqError`) print one line and
exit with status 2; Ctrl-C exits with 130 without a traceback.
"""

from __future__ import annotations

import os

# On a shared 2-core machine PyTorch's OpenMP threads spin while waiting and slow
# training 5-9x when other work runs (measured: 800-800 net, 76 ms vs 11 ms per
# iteration); passive waiting costs ~20% on an idle machine. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from collections.abc import Sequence

from masq import __version__
from masq.cli import data_cmd, experiment_cmd, grid_cmd
from masq.errors import MasqError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="masq",
        description="EWC with the diagonal Fisher or MaSQ: reproduce Gepperth & Wiech and beyond.",
    )
    parser.add_argument("--version", action="version", version=f"masq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (data_cmd, experiment_cmd, grid_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``masq`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MasqError as err:
        print(f"masq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("masq: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
