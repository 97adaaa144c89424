"""One validation grid run on two machines (e.g. the CPU and a GPU): are they within seed noise?

Reads two tables printed by ``benchmarks/bf16_validation.py`` (the same grid, several seeds,
fp32 and bf16, each run on one device) and prints, per configuration, precision and criterion
(best, last on the union of all tasks), the mean of each, the difference Δ = second − first
and the pooled seed standard deviation sqrt((s₁² + s₂²) / 2) it is measured against, then the
largest |Δ| / std. The tables give means and stds to two decimals, which is enough for the
ratio; the records behind the second table can be re-tabulated with bf16_validation.py.

    python benchmarks/device_validation.py docs/bench/bf16_validation.txt \
        docs/bench/bf16_validation_gpu.txt --names CPU GPU
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from _common import print_table

# The columns of bf16_validation.py's table: the configuration, then the four mean ± std cells.
KEY = ("SLT", "net", "ε2", "λ", "method")
CELLS = ("best fp32", "best bf16", "last fp32", "last bf16")


def read_table(path: Path) -> dict[tuple[str, ...], dict[str, tuple[float, float]]]:
    """{configuration: {cell: (mean, std)}} of one printed table (its Markdown rows)."""
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=False))
        key = tuple(cells[k] for k in KEY)
        table[key] = {
            c: (float(cells[c].split("±")[0]), float(cells[c].split("±")[1])) for c in CELLS
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="bf16_validation.py's table of the first device")
    parser.add_argument("second", type=Path, help="... and of the second")
    parser.add_argument("--names", nargs=2, default=("first", "second"), help="the two devices")
    args = parser.parse_args()
    a, b = read_table(args.first), read_table(args.second)
    shared = [k for k in a if k in b]
    if not shared:
        raise SystemExit("device_validation: the two tables share no configuration")
    one, two = args.names
    rows, worst = [], 0.0
    for key in shared:
        for cell in CELLS:
            (m1, s1), (m2, s2) = a[key][cell], b[key][cell]
            std = math.sqrt((s1**2 + s2**2) / 2)
            ratio = abs(m2 - m1) / std if std > 0 else math.inf
            worst = max(worst, ratio)
            rows.append({**dict(zip(KEY, key, strict=True)), "cell": cell, one: f"{m1:.2f}",
                         two: f"{m2:.2f}", "ratio": f"{m2 - m1:+.2f} / {std:.2f}"})  # fmt: skip
    print_table(
        f"the same grid on {one} and {two}: mean over seeds, %, and Δ = {two} − {one} against "
        "the pooled seed std",
        rows,
        [*((k, k) for k in KEY), ("cell", "criterion"), (one, one), (two, two),
         ("ratio", "Δ / std")],
    )  # fmt: skip
    print(f"\n{len(rows)} cells; largest |Δ| / seed std: {worst:.2f}")


if __name__ == "__main__":
    main()
