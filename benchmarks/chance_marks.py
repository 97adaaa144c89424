"""How often a peer table marks a cell (◆) by chance alone.

For every published cell with a spread, both means are drawn from one normal distribution
whose SD is the publication's (its SEM × √N over its N seeds): ours the mean of n draws, with
the SEM estimated from them as ``masq peers`` does, the publication's mean with its SEM. The
cell is marked as ``masq peers`` marks it,

    |Δ| > MIN_POINTS  and  |Δ| > 2 √(SEM_ours² + SEM_published²),

and the script prints P(◆) per cell, the expected number of marks in the table, and the
probability of two or more (the cells taken as independent).

Usage:
    python benchmarks/chance_marks.py vdv2019-permuted --seeds 3 --published-seeds 20
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from _common import print_table
from masq.analysis.peers import MIN_POINTS
from masq.grid import peers


def chance_of_a_mark(sd: float, published_sem: float, seeds: int, draws: int, seed: int) -> float:
    """P(◆) when ours (``seeds`` draws of N(0, sd²)) and the published mean (N(0, SEM²))
    share their expectation, estimated from ``draws`` simulated tables."""
    rng = np.random.default_rng(seed)
    ours = rng.normal(0.0, sd, size=(draws, seeds))
    diff = ours.mean(axis=1) - rng.normal(0.0, published_sem, size=draws)
    sem = ours.std(axis=1, ddof=1) / math.sqrt(seeds)
    bound = 2 * np.sqrt(sem**2 + published_sem**2)
    return float(np.mean((np.abs(diff) > MIN_POINTS) & (np.abs(diff) > bound)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a peer preset, e.g. vdv2019-permuted")
    parser.add_argument("--seeds", type=int, default=3, help="our seeds per cell")
    parser.add_argument("--published-seeds", type=int, default=20, help="the publication's N")
    parser.add_argument("--draws", type=int, default=200_000, help="simulated tables")
    parser.add_argument("--seed", type=int, default=0, help="the simulation's random seed")
    args = parser.parse_args()
    preset = peers.load_peer_preset(args.preset)
    rows = []
    for row in preset.rows:
        for column in preset.columns:
            published = row.published.get(column)
            if published is None or not math.isfinite(published[1]) or published[1] <= 0:
                continue  # no spread published: the mark reads our SEM alone
            sem = published[1]
            sd = sem * math.sqrt(args.published_seeds)
            p = chance_of_a_mark(sd, sem, args.seeds, args.draws, args.seed)
            rows.append({"cell": f"{row.name}, {preset.label(column)}", "sd": f"{sd:.2f}",
                         "sem": f"{sem:.2f}", "p": f"{100 * p:.1f}", "_p": p})  # fmt: skip
    chances = np.array([r["_p"] for r in rows])
    none = float(np.prod(1 - chances))
    one = float(sum(c * np.prod(np.delete(1 - chances, i)) for i, c in enumerate(chances)))
    columns = [("cell", "cell"), ("sd", "published SD"), ("sem", "published SEM"),
               ("p", f"P(◆ by chance), %, {args.seeds} seeds")]  # fmt: skip
    print_table(f"{preset.title}: chance marks ({args.draws:,} simulated tables per cell, "
                f"seed {args.seed})", rows, columns)  # fmt: skip
    print(f"\nexpected marks by chance: {chances.sum():.2f} of {len(rows)} cells; "
          f"P(two or more): {100 * (1 - none - one):.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
