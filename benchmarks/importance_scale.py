"""The scale-matched λ of a peer preset's row: where to centre its λ sweep.

Two importances Ω_a and Ω_b of one task-1 state penalise alike, to first order, when
λ_b · mean(Ω_b) = λ_a · mean(Ω_a), the means taken over all parameters. For each column of a
peer preset this script takes seed 0's task-1 state (from the results directory's cache, trained
and cached there if missing), computes the importance of a reference row (the publication's EWC,
at its published λ) and of another row (cached as the grid caches them, so its grid reuses
them), and prints

    ratio = mean(Ω_reference) / mean(Ω_row),    λ* = λ_reference · ratio,

and, where the row's λ sweep is stored, the λ chosen on validation and its distance from λ* in
decades. The vdv2019-permuted preset centres its MaSQ sweep on λ* this way (its notes).

Usage:
    python benchmarks/importance_scale.py vdv2019-permuted "EWC with MaSQ (mean)" \
        --reference EWC --results results/peers
"""

from __future__ import annotations

import argparse
import math

import torch

from _common import print_table
from masq.analysis import peers as analysis
from masq.analysis.common import lam_on_validation, tuning_runs
from masq.grid import peers
from masq.grid.group import load_or_compute_importance, load_or_train_d1, tasks_for
from masq.runid import run_id
from masq.store import Store, load


def mean_importance(importance: dict[str, torch.Tensor]) -> float:
    """Σ_k Ω_k / (number of parameters), in float64."""
    total = sum(float(v.double().sum()) for v in importance.values())
    return total / sum(v.numel() for v in importance.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a peer preset, e.g. vdv2019-permuted")
    parser.add_argument("row", help='the row whose sweep to centre, e.g. "EWC with MaSQ (mean)"')
    parser.add_argument("--reference", default="EWC", help="the row at a published λ")
    parser.add_argument("--results", required=True, help="results dir (its caches are used)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = peers.load_peer_preset(args.preset)
    store = Store(args.results)
    cells = preset.cells({"seed": (0,)}, [args.reference, args.row])
    df = load(args.results) if store.listed_ids() else None
    rows = []
    for column in preset.columns:
        reference = cells[peers.cell_key(args.reference, column)][0]
        swept = cells[peers.cell_key(args.row, column)]
        tasks = tasks_for(reference, None)
        d1, _ = load_or_train_d1(store, reference, tasks)
        means = [mean_importance(load_or_compute_importance(store, c, d1, tasks)[0])
                 for c in (reference, swept[0])]  # fmt: skip
        ratio = means[0] / means[1]
        matched = reference.lam * ratio
        chosen = math.nan
        ids = [run_id(c) for c in swept]
        if df is not None and set(ids) <= set(df["run_id"]):
            frame = analysis.peer_frame(df, {peers.cell_key(args.row, column): ids}, preset)
            chosen = lam_on_validation(tuning_runs(frame, preset.tune_seeds))
        rows.append({
            "column": preset.label(column),
            "mean Ω (reference)": f"{means[0]:.3e}",
            "mean Ω (row)": f"{means[1]:.3e}",
            "ratio": f"{ratio:.1f}",
            "λ reference": f"{reference.lam:g}",
            "λ* (scale-matched)": f"{matched:.2e}",
            "λ chosen": "not stored" if math.isnan(chosen) else f"{chosen:g}",
            "decades from λ*": "" if math.isnan(chosen) else f"{math.log10(chosen / matched):+.2f}",
        })  # fmt: skip
    title = (f"{preset.name}: {args.row} against {args.reference}, seed 0's task 1 "
             f"(results {args.results})")  # fmt: skip
    print_table(title, rows, [(k, k) for k in rows[0]])


if __name__ == "__main__":
    main()
