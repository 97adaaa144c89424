"""The grid's `--dry-run` estimate against the wall time of the same grid, end to end.

    .venv/bin/python benchmarks/estimate_check.py [--precision bf16 fp32] \\
        [--slt D5-5 DP10-10] [--hidden 200-200 800-800] [--preset paper] [--workers 2]

For each precision: ``masq grid --preset PRESET --slt ... --hidden ... --precision P --dry-run``
prints the estimate a user sees (its calibration runs a few iterations of the grid's
architectures on this machine); then the same command without ``--dry-run`` runs the sub-grid
into a fresh temporary results directory (task-1 trainings, importance passes, stacked
re-trainings, evaluations, the store's writes) and its wall time is taken from the start of
the process to its end. Prints a Markdown table: the sub-grid, runs, the estimate, the measured
wall time and their ratio (measured / estimated; the target is within 20 %, i.e. 0.8-1.2).

Both commands are run as a user runs them (``python -m masq``), so the start-up, the data
loading and the calibration are part of what is compared: the estimate is of the grid's work,
the measurement includes the process around it, and the difference says how far the number a
user plans with is from what happens.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

_ESTIMATE = re.compile(r"estimated time with .*?: ([0-9.]+) (s|min|h)\b")
_UNIT = {"s": 1.0, "min": 60.0, "h": 3600.0}


def parse_estimate(text: str) -> float:
    """Seconds of the ``estimated time ...: X unit`` line in a dry run's output."""
    match = _ESTIMATE.search(text)
    if match is None:
        raise SystemExit(f"estimate_check: no estimate in the dry run's output:\n{text[-2000:]}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def masq(args: list[str]) -> tuple[float, str]:
    """Run ``python -m masq ARGS``; (wall seconds, stdout + stderr). Exits on failure."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "masq", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"estimate_check: masq {' '.join(args)} failed ({done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-2000:]}"
        )
    return seconds, done.stdout + done.stderr


def runs_of(text: str) -> int:
    """The number of runs from the dry run's first line ("grid: N runs ...")."""
    match = re.search(r"(\d+) runs", text)
    return int(match.group(1)) if match else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--slt", nargs="+", default=["D5-5", "DP10-10"])
    parser.add_argument("--hidden", nargs="+", default=["200-200", "800-800"])
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    rows = []
    for precision in args.precision:
        axes = ["grid", "--preset", args.preset, "--slt", *args.slt, "--hidden", *args.hidden]
        axes += ["--precision", precision, "--no-progress"]
        if args.workers is not None:
            axes += ["--workers", str(args.workers)]
        with tempfile.TemporaryDirectory(prefix="masq-estimate-") as results:
            _, dry = masq([*axes, "--results", results, "--dry-run"])
            estimate = parse_estimate(dry)
            print(f"{precision}: estimate {estimate:.0f} s; running ...", flush=True)
            wall, _ = masq([*axes, "--results", results])
        print(f"{precision}: measured {wall:.0f} s", flush=True)
        rows.append((precision, runs_of(dry), estimate, wall))

    print()
    print(
        f"masq grid --preset {args.preset} --slt {' '.join(args.slt)} "
        f"--hidden {' '.join(args.hidden)} (workers: {args.workers or 'default'})"
    )
    print()
    print("| precision | runs | estimate (s) | measured (s) | measured / estimate |")
    print("|---|---|---|---|---|")
    for precision, runs, estimate, wall in rows:
        print(f"| {precision} | {runs} | {estimate:.0f} | {wall:.0f} | {wall / estimate:.2f} |")


if __name__ == "__main__":
    main()
