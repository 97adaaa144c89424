"""bf16 against fp32 over seeds: a results directory's runs side by side, per precision.

For every configuration that was run in both precisions (same SLT, architecture, ε2, λ,
importance; several seeds each), prints best and last on the union of all tasks as
mean ± std over seeds in fp32 and in bf16, the difference of the means, and the seed standard
deviation it is measured against, then the largest |difference| / std.

Usage (after the grids of docs/results/speed.md, "Is bf16 within seed noise?"):
    python benchmarks/bf16_validation.py results/bf16val
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from _common import print_table
from masq.consolidation import method_label
from masq.store import load


def summary(df: pd.DataFrame) -> tuple[list[dict], float]:
    """Rows of the side-by-side table and the largest |Δ mean| / seed std."""
    keys = ["slt", "hidden", "lr2", "lam", "importance", "scale", "fisher_labels"]
    rows, worst = [], 0.0
    for values, group in df.groupby(keys, sort=True, dropna=False):
        by = {p: g for p, g in group.groupby("precision")}
        if set(by) != {"fp32", "bf16"}:
            continue
        row = dict(zip(keys, values, strict=True))
        out = {"slt": row["slt"], "net": row["hidden"], "lr2": f"{row['lr2']:g}",
               "lam": f"{row['lam']:g}", "method": method_label(row),
               "seeds": f"{len(by['fp32'])}/{len(by['bf16'])}"}  # fmt: skip
        for crit in ("best", "last"):
            a, b = by["fp32"][f"{crit}.union"], by["bf16"][f"{crit}.union"]
            diff = b.mean() - a.mean()
            std = math.sqrt((a.std(ddof=1) ** 2 + b.std(ddof=1) ** 2) / 2)
            ratio = abs(diff) / std if std > 0 else math.inf
            worst = max(worst, ratio)
            out[f"{crit} fp32"] = f"{100 * a.mean():.2f} ± {100 * a.std(ddof=1):.2f}"
            out[f"{crit} bf16"] = f"{100 * b.mean():.2f} ± {100 * b.std(ddof=1):.2f}"
            out[f"{crit} Δ/std"] = f"{100 * diff:+.2f} / {100 * std:.2f}"
        rows.append(out)
    return rows, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results directories")
    args = parser.parse_args()
    df = pd.concat([load(r) for r in args.results], ignore_index=True)
    rows, worst = summary(df)
    print_table(
        "best and last on the union of all tasks, % (mean ± std over seeds); "
        "Δ = bf16 − fp32 of the means against the pooled seed std",
        rows,
        [("slt", "SLT"), ("net", "net"), ("lr2", "ε2"), ("lam", "λ"), ("method", "method"),
         ("seeds", "seeds"), ("best fp32", "best fp32"), ("best bf16", "best bf16"),
         ("best Δ/std", "Δ / std"), ("last fp32", "last fp32"), ("last bf16", "last bf16"),
         ("last Δ/std", "Δ / std")],
    )  # fmt: skip
    print(f"\nlargest |Δ mean| / seed std: {worst:.2f}")


if __name__ == "__main__":
    main()
