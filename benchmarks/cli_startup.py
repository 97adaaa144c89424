"""Start-up time of the ``masq`` command: ``masq --help`` and each command's ``--help``.

Each is started as a fresh process (the console script of this Python's environment, or
``python -m masq`` where there is none) ``--repeats`` times; the table gives the median and the
fastest wall-clock time, and whether the command's process imported torch, pandas or
matplotlib (``python -X importtime``). The load of the machine is printed first: other jobs on
the cores slow every start.

    python benchmarks/cli_startup.py [--repeats 5] [--commands run grid ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# ``masq --help`` first, then every command (the order of ``masq --help``).
COMMANDS: tuple[str, ...] = (
    "",
    "run",
    "compare",
    "grid",
    "table",
    "consistency",
    "migrate",
    "data",
    "analyze",
    "report",
    "imm",
    "imm-report",
    "table1",
    "export",
    "import",
    "peers",
)
HEAVY: tuple[str, ...] = ("torch", "pandas", "matplotlib", "ray", "tensorboard")


def masq_command() -> list[str]:
    """The ``masq`` console script next to this Python, else ``python -m masq``."""
    script = Path(sys.executable).with_name("masq")
    return [str(script)] if script.exists() else [sys.executable, "-m", "masq"]


def help_argv(command: str) -> list[str]:
    """The arguments of ``masq [COMMAND] --help``."""
    return [command, "--help"] if command else ["--help"]


def seconds_of(argv: Sequence[str]) -> float:
    """Wall-clock seconds of one run of ``argv`` (its output discarded; it must succeed)."""
    start = time.perf_counter()
    subprocess.run(list(argv), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_imports(command: str) -> list[str]:
    """The heavy packages (:data:`HEAVY`) that ``masq COMMAND --help`` imports."""
    code = "import sys; sys.argv = ['masq', *sys.argv[1:]]; from masq.cli import main; main()"
    argv = [sys.executable, "-X", "importtime", "-c", code, *help_argv(command)]
    err = subprocess.run(argv, capture_output=True, text=True, check=True).stderr
    names = {line.split("|")[-1].strip() for line in err.splitlines() if "|" in line}
    return [name for name in HEAVY if name in names]


def table(commands: Sequence[str], repeats: int) -> list[str]:
    """One Markdown row per command: median and fastest start, heavy imports."""
    lines = [
        "| command | median s | fastest s | heavy imports |",
        "| --- | --- | --- | --- |",
    ]
    base = masq_command()
    for command in commands:
        times = [seconds_of([*base, *help_argv(command)]) for _ in range(repeats)]
        heavy = ", ".join(heavy_imports(command)) or "none"
        shown = " ".join(["masq", *help_argv(command)])
        lines.append(f"| `{shown}` | {statistics.median(times):.2f} | {min(times):.2f} | {heavy} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the machine's load and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="starts per command (default 5)")
    parser.add_argument(
        "--commands",
        nargs="+",
        default=list(COMMANDS),
        help="commands to time ('' is masq --help; default: all)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"{os.cpu_count()} cores, load average {load} (1, 5, 15 min); {' '.join(masq_command())}")
    print("\n".join(table(args.commands, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
