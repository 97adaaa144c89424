"""``masq report``: one browsable HTML page (and the same as Markdown) from results and analyses.

masq report --results runs/paper docs/analysis --bench docs/bench/importance_part1.txt \\
    --out report/
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from masq.config import SelectOn
from masq.errors import ConfigError
from masq.fileio import error_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report`` to ``sub``."""
    p = sub.add_parser(
        "report",
        help="one static HTML report (and Markdown) of results and analyses",
        description="Write OUT/index.html, OUT/report.md and the figures from any number of "
        "results directories (`masq grid`) and analysis output directories (`masq analyze`): "
        "Table 1, consistency figures, Table 2, FIM versus MaSQ, λ sweeps, the importance "
        "benchmark, accuracy matrices and IMM runs, whichever exist; a missing part names the "
        "command that produces it.",
    )
    p.add_argument(
        "--results",
        nargs="+",
        required=True,
        metavar="DIR",
        help="results and/or analysis output directories",
    )
    p.add_argument(
        "--bench",
        nargs="+",
        default=[],
        metavar="FILE",
        help="output files of benchmarks/importance.py to include",
    )
    p.add_argument(
        "--select-on",
        choices=SelectOn.values(),
        default="test",
        help="Table 1 selected on the test (the paper) or validation curves",
    )
    p.add_argument("--title", default="masq report", help="the page's title")
    p.add_argument(
        "--out", default="report", metavar="DIR", help="output directory (default: report)"
    )
    p.set_defaults(func=run_report)


def check_text_files(paths: Sequence[str], flag: str) -> None:
    """A one-line ConfigError naming ``flag`` and the file when one of ``paths`` exists but
    cannot be read or is not UTF-8 text (a missing one is refused by the report itself)."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError as err:
            raise ConfigError(f"{flag} {path!r}: cannot read it ({error_text(err)})") from None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{flag} {path!r}: not UTF-8 text (byte {data[err.start]:#04x} at offset "
                f"{err.start}); give a benchmark output file saved as UTF-8"
            ) from None


def run_report(args: argparse.Namespace) -> int:
    """``masq report``."""
    from masq.report.html import build_report

    check_text_files(args.bench, "--bench")  # before any work

    report = build_report(
        args.results, args.out, bench=args.bench, select_on=args.select_on, title=args.title
    )
    for part in report.parts:
        state = "present" if part.present else f"missing (produce it with: {part.missing})"
        print(f"  {part.title}: {state}")
    print(f"written: {report.html}, {report.markdown}")
    return 0
