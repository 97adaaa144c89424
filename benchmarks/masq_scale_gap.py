"""How far MaSQ ``sum`` is from B_MaSQ × MaSQ ``mean`` on real task-1 states.

With equal batches of size B the two conventions differ by exactly the factor B, so EWC with
MaSQ ``mean`` at λ equals MaSQ ``sum`` at λ / B. A shorter last batch |b_K| < B breaks this
entry by entry: ``sum`` weights its term (1/K) |b_K| ḡ_K² where B × ``mean`` has (1/K) B ḡ_K²,
so sum / (B · mean) lies in [|b_K| / B, 1] per entry (1 where the last batch contributes
nothing, |b_K| / B where only it does). This script reads the importance cache of a results
directory (pairs of MaSQ mean/sum computed at the same task-1 state) and prints, per pair, the
range of that ratio over entries above 1e-30 (smaller ones are float32 underflow of dead
units), the share of entries off by more than 0.1 %, and the ratio of the totals.

Usage (any results dir whose grid ran MaSQ with both scales, e.g. ``make imm``):
    python benchmarks/masq_scale_gap.py results/imm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import print_table
from masq.config import hidden_text

FLOOR = 1e-30  # float32 entries below this are underflow, not signal


def pairs(results: Path) -> list[tuple[dict, Path, Path]]:
    """(config without scale, mean file, sum file) for every MaSQ pair in the cache."""
    found: dict[str, dict[str, Path]] = {}
    configs: dict[str, dict] = {}
    for meta_path in sorted((results / "importance").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        config = meta["meta"]["meta"]["config"]
        if config.get("importance") != "masq":
            continue
        rest = {k: v for k, v in config.items() if k != "scale"}
        key = json.dumps(rest, sort_keys=True)
        configs[key] = rest
        found.setdefault(key, {})[config["scale"]] = meta_path.with_suffix(".safetensors")
    return [(configs[k], d["mean"], d["sum"]) for k, d in found.items() if len(d) == 2]


def gap_row(config: dict, mean_file: Path, sum_file: Path) -> dict:
    """One table row: sum / (B · mean) over the entries of one pair."""
    mean, total = load_file(str(mean_file)), load_file(str(sum_file))
    m = torch.cat([mean[k].flatten().double() for k in mean])
    s = torch.cat([total[k].flatten().double() for k in mean])
    b = config["masq_batch"]
    live = m > FLOOR
    ratio = s[live] / (b * m[live])
    return {
        "SLT": config["slt"],
        "net": hidden_text(config["hidden"]),
        "seed": config["seed"],
        "entries": m.numel(),
        "below 1e-30": f"{100 * (1 - live.double().mean().item()):.1f} %",
        "min ratio": f"{ratio.min().item():.4f}",
        "max ratio": f"{ratio.max().item():.4f}",
        "off > 0.1 %": f"{100 * ((ratio - 1).abs() > 1e-3).double().mean().item():.2f} %",
        "Σsum / (B·Σmean)": f"{(s.sum() / (b * m.sum())).item():.5f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results directory with an importance cache")
    args = parser.parse_args()
    rows = [gap_row(*p) for p in pairs(args.results)]
    if not rows:
        raise SystemExit(f"{args.results}: no MaSQ mean/sum pairs in its importance cache")
    rows.sort(key=lambda r: (r["SLT"], r["seed"]))
    title = "MaSQ sum / (B_MaSQ x MaSQ mean) per entry, at the same task-1 state"
    print_table(title, rows, [(k, k) for k in rows[0]])


if __name__ == "__main__":
    main()
