"""The random streams of a run: one ``torch.Generator`` seed per source of randomness.

``stream_seed(seed, name)`` = the first 8 bytes of sha256("masq:<seed>:<name>") read as a
big-endian integer, masked to 63 bits. Streams:

- "tasks": the pixel permutations of permuted SLTs;
- "task1-permutation": task 1's own permutation with ``permute_first`` (tasks 2..T keep
  theirs from "tasks");
- "class-order": the permutation of the classes of a class split with ``class_order``
  seeded (:func:`masq.tasks.seeded_blocks`);
- "init": the initialization of the network;
- "d<t>-batches": the mini-batch stream of phase t (training on task t), t = 1, 2, ...;
- "d<t>-drop": the drop-transfer masks of IMM's phase t (:mod:`masq.consolidation.imm`);
- "fisher-labels": labels sampled from the model for ``fisher_labels="sampled"`` in the
  importance pass of task 1, and "fisher-labels-d<t>" for that of task t >= 2.

Each depends on ``seed`` only: runs that share task 1's state (a grid over lr2, λ,
importance...) see exactly the same later mini-batches. The names of a two-task run are those
of masq 0.1 ("d1-batches", "d2-batches", "fisher-labels"), so its numbers are unchanged.
"""

from __future__ import annotations

import hashlib
import re

STREAMS: tuple[str, ...] = (
    "tasks",
    "task1-permutation",
    "class-order",
    "init",
    "d1-batches",
    "d2-batches",
    "fisher-labels",
)
_STREAM_RE = re.compile(
    r"^(tasks|task1-permutation|class-order|init|d[1-9]\d*-(batches|drop)|fisher-labels(-d[2-9]|-d[1-9]\d+)?)$"
)


def stream_seed(seed: int, stream: str) -> int:
    """The seed of random stream ``stream`` of run ``seed`` (module docstring)."""
    if not _STREAM_RE.match(stream):
        raise ValueError(f"unknown random stream {stream!r}; known: {STREAMS} and d<t>-batches")
    digest = hashlib.sha256(f"masq:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def batches_stream(phase: int) -> str:
    """The mini-batch stream of phase ``phase`` (0-based): "d1-batches", "d2-batches", ..."""
    return f"d{phase + 1}-batches"


def labels_stream(task: int) -> str:
    """The label-sampling stream of task ``task``'s importance pass (0-based)."""
    return "fisher-labels" if task == 0 else f"fisher-labels-d{task + 1}"
