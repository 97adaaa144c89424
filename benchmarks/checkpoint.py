"""What a phase checkpoint (masq.protocol.resume) costs: its size, and the time to save and load
it, for the stacks of the peer campaigns at their largest (the state after the second-to-last
phase, when EWC holds the most anchors).

The state is built as the stacked engine keeps it: K runs' weights, their Adam moments, and
per run EWC's list of anchors (θ*, F) of every task so far; the weights are random (a
checkpoint's cost depends on sizes only). Each case is saved and loaded ``--repeats`` times in
a temporary directory on the results disk's file system (``--dir``); the table gives the
median. The load of the machine is printed first.

    python benchmarks/checkpoint.py [--repeats 3] [--dir results]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from masq.architecture import mlp_widths
from masq.consolidation.ewc import Anchor
from masq.protocol.resume import PhaseCheckpoint
from masq.training import AdamMoments

# (name, K runs, hidden, inputs, outputs, tasks done)
CASES = (
    ("split MNIST, stack of 16, after phase 4 of 5", 16, (400, 400), 784, 10, 4),
    ("permuted MNIST (32×32), stack of 3, after phase 9 of 10", 3, (1000, 1000), 1024, 100, 9),
)


def _state(widths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        out[f"{2 * i}.weight"] = torch.randn(b, a)
        out[f"{2 * i}.bias"] = torch.randn(b)
    return out


def _square(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.square() for k, v in state.items()}


def loop_state(k: int, hidden: tuple[int, ...], inputs: int, outputs: int, done: int) -> Any:
    """The dict continue_stacked saves after phase ``done`` for K EWC runs."""
    widths = mlp_widths(hidden, inputs, outputs)
    current = [_state(widths) for _ in range(k)]
    adam = [AdamMoments(done * 1000, _state(widths), _state(widths)) for _ in range(k)]
    anchors = [
        [
            Anchor(MappingProxyType(_state(widths)), MappingProxyType(_square(_state(widths))))
            for _ in range(done)
        ]
        for _ in range(k)
    ]
    return {
        "current": current,
        "curves": [[{"iteration": [0, 1000], "D1": [0.1, 0.9]}] * (done + 1)] * k,
        "train_s": [[1.0] * (done + 1)] * k,
        "weights": None,
        "diverged": [None] * k,
        "states": anchors,
        "imp_seconds": [[1.0] * (done + 1)] * k,
        "adam": adam,
        "stack_seconds": 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average: {load} on {os.cpu_count()} cores")
    print()
    print("| stack | file (MB) | save (s) | load (s) |")
    print("|---|---|---|---|")
    for name, k, hidden, inputs, outputs, done in CASES:
        state = loop_state(k, hidden, inputs, outputs, done)
        saves, loads, size = [], [], 0
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            point = PhaseCheckpoint(Path(tmp) / "phases" / "x.pt", "x")
            for _ in range(args.repeats):
                start = time.perf_counter()
                point.save(done, state)
                saves.append(time.perf_counter() - start)
                size = point.path.stat().st_size
                start = time.perf_counter()
                loaded = point.load()
                loads.append(time.perf_counter() - start)
                assert loaded is not None and loaded[0] == done
                del loaded
        print(
            f"| {name} | {size / 1e6:.0f} | {statistics.median(saves):.2f} | "
            f"{statistics.median(loads):.2f} |"
        )


if __name__ == "__main__":
    main()
