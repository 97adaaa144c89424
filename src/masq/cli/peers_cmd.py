"""``masq peers``: a published table beside ours (:mod:`masq.analysis.peers`).

Its runs come from ``masq grid --preset NAME --results DIR`` (resumable; it records which runs
make each cell in DIR/peers-NAME.json); ``masq peers NAME --results DIR`` then lays the table
out as the publication does: ours as mean ± SEM over seeds, the published value, the
difference and a mark where they differ by more than a point and two SEMs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from masq.errors import ConfigError

if TYPE_CHECKING:
    from masq.grid.peer_manifest import Manifest
    from masq.grid.peers import PeerPreset

HELP = "a published table beside ours (its runs: masq grid --preset NAME)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``peers``."""
    p = sub.add_parser(
        "peers",
        help=HELP,
        description="Tabulate the runs of a peer preset (a published table: `masq peers "
        "--list`) stored in --results by `masq grid --preset NAME --results DIR`: rows are "
        "the publication's methods (and ours), columns its scenarios; each cell ours (mean ± "
        "SEM over seeds, λ chosen on validation where the cell sweeps it) beside the "
        "published value and the difference. Writes peers.md, peers.csv, peers_points.csv, "
        "peers.png and peers.json into --out.",
    )
    p.add_argument("name", nargs="?", default=None, help="the preset, e.g. vdv2019-split")
    p.add_argument("--results", default=None, help="results directory of its runs")
    p.add_argument("--out", default=None, help="output directory (default: RESULTS/NAME)")
    p.add_argument("--list", action="store_true", help="list the peer presets and stop")
    shipped = ("tabulate the preset's runs as shipped, whatever grids with flags (e.g. "
               "--seed-list 3 4 for more seeds of a cell) recorded in --results")  # fmt: skip
    p.add_argument("--shipped", action="store_true", help=shipped)
    p.set_defaults(func=_peers)


def _peers(args: argparse.Namespace) -> int:
    import numpy as np

    from masq.analysis import peer_files
    from masq.analysis import peers as analysis
    from masq.grid import peer_manifest, peers, tune
    from masq.runtime import check_out_dir
    from masq.store import load, open_store

    if args.list:
        for name in peers.list_peer_presets():
            preset = peers.load_peer_preset(name)
            held = tune.held_count(preset.cells(), preset.tune_seeds, preset.tune_axes)
            later = f" + {held} at the λ chosen on the tuning runs" if held else ""
            print(f"{name}: {preset.title} ({preset.citation}, {preset.source}); "
                  f"{len(preset.configs())} runs{later}")  # fmt: skip
        return 0
    if args.name is None or args.results is None:
        raise ConfigError("masq peers: give a preset NAME and --results DIR (or --list)")
    preset = peers.load_peer_preset(args.name)
    open_store(args.results)
    manifest = None if args.shipped else _manifest(args.results, preset)
    cells, expected = peer_manifest.table_cells(preset, manifest)
    df = load(args.results)
    frame = analysis.peer_frame(df, cells, preset, expected)
    table = analysis.peer_table(frame, preset)
    out = check_out_dir(args.out or Path(args.results) / preset.name)
    if preset.tunes and expected:  # the runs that count: tuning sweeps, chosen λ
        total = sum(expected.values())
        done = int(np.minimum(table["runs"], table["expected"]).sum()) if len(table) else 0
    else:
        ids = {rid for rids in cells.values() for rid in rids}
        total = len(ids)
        done = len(set(df["run_id"]) & ids) if not df.empty else 0
    body = {"runs": done, "expected": total, "command": remake_command(args),
            "compute": _compute(args.results, cells)}  # fmt: skip
    md, written = peer_files.write_outputs(table, frame, preset, out, body=body)
    print(md, end="")
    print(f"{done} of {total} runs stored; written: "
          f"{', '.join(str(p) for p in written)}")  # fmt: skip
    return 0


def remake_command(args: argparse.Namespace) -> str:
    """The ``masq peers`` command line that remakes this table (peers.json's "command")."""
    command = f"masq peers {args.name} --results {shlex.quote(str(args.results))}"
    return command + (" --shipped" if args.shipped else "")


def _compute(results: str, cells: dict[str, list[str]]) -> dict[str, float]:
    """{"runs", "worker_seconds"}: the stored runs of the table's cells and the worker time
    their records say they took together (:func:`masq.grid.plan.worker_seconds`)."""
    from masq.config import RunConfig
    from masq.grid.plan import worker_seconds
    from masq.store import load_record, open_store

    stored = open_store(results).stored_ids(repair=False)
    ids = sorted({rid for rids in cells.values() for rid in rids} & stored)
    runs = []
    for rid in ids:
        result = load_record(results, rid)["result"]
        runs.append((RunConfig.from_dict(result["config"]), result.get("timings", {})))
    return {"runs": len(ids), "worker_seconds": round(worker_seconds(runs), 1)}


def _manifest(results: str, preset: PeerPreset) -> Manifest | None:
    """The manifest of the last grid run on `preset` in `results`, or None (with a line on
    stderr saying why) when it is missing or another definition of the preset wrote it."""
    from masq.grid import peer_manifest

    manifest = peer_manifest.load_manifest(results, preset.name)
    where = peer_manifest.manifest_path(results, preset.name)
    if manifest is not None and manifest.definition != peer_manifest.definition(preset):
        print(f"masq peers: {where} was written by another definition of {preset.name} (its "
              "settings have changed since): tabulating the runs of the preset as shipped",
              file=sys.stderr)  # fmt: skip
        return None
    if manifest is None:
        print(f"masq peers: {where} is missing: tabulating the runs of the preset as shipped "
              "(no flags)", file=sys.stderr)  # fmt: skip
    elif manifest.overrides:
        flags = ", ".join(f"{k} = {v}" for k, v in sorted(manifest.overrides.items()))
        print(f"masq peers: tabulating the runs of the grid run with flags ({flags}) that "
              f"{where} records; --shipped tabulates the preset's own",
              file=sys.stderr)  # fmt: skip
    return manifest
