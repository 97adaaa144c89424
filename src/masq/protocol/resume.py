"""Phase checkpoints: the state of T-task runs between two phases, so that runs stopped in
phase t (Ctrl-C, a killed job, the end of a session) start again at phase t, not phase 2.

A run's phases are deterministic given the state at the start of the phase: phase t draws its
mini-batches from its own stream (:func:`masq.streams.batches_stream`), and its importance
pass and method step read only the network, the tasks and the run's seed. So a loop that
saves, at the end of phase t,

    S_t = (θ after t, Adam's moments, each run's method state and importance seconds,
           the curves and timings so far, which runs diverged)

and, started again, loads S_t and goes on with phase t + 1, gives the records of the loop
that never stopped (the timings aside): ``tests/test_resume.py`` checks it for the stacked
engine, the one-by-one loop, runs trained alike and SI.

The file is a pickle (``torch.save``): a method's state is whatever its
:class:`~masq.consolidation.Method` keeps, plugins' included, which no tensor format holds.
masq writes it atomically in its own results directory (``DIR/phases``), reads it back only
there and deletes it once the runs are stored; it is never exported. A file that is not one
of these, or that another masq version or other runs wrote, is ignored and the runs start
from phase 2.
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from masq import __version__
from masq.fileio import atomic_write, warn

PHASES_DIR = "phases"
FORMAT = "masq-phase-checkpoint"


def read_only(mapping: dict[str, Any]) -> MappingProxyType[str, Any]:
    """A read-only view of ``mapping`` (how EWC's anchors hold their tensors); what a pickled
    one is rebuilt with."""
    return MappingProxyType(mapping)


def _reduce_read_only(view: MappingProxyType[str, Any]) -> tuple[Any, tuple[dict[str, Any]]]:
    return read_only, (dict(view),)


class _Pickle:
    """The pickle module ``torch.save`` writes a checkpoint with: pickle's, with read-only
    mappings (which pickle refuses) written as dicts to be wrapped again."""

    class Pickler(pickle.Pickler):
        dispatch_table = {  # noqa: RUF012 (pickle reads it from the instance)
            **copyreg.dispatch_table,
            MappingProxyType: _reduce_read_only,
        }


@dataclass
class PhaseCheckpoint:
    """Where the runs ``key`` names keep their state between phases, saved at most every
    ``every`` seconds (0: after every phase; a phase shorter than that loses little when
    stopped); ``say`` is given a line when a saved state is resumed."""

    path: Path
    key: str
    every: float = 0.0
    say: Callable[[str], None] | None = None  # told when a state is resumed
    _last: float = field(default_factory=time.perf_counter, repr=False)
    _broken: bool = field(default=False, repr=False)

    def load(self, device: torch.device | str = "cpu") -> tuple[int, dict[str, Any]] | None:
        """(the last phase done, 0-based; the loop's state then), or None when there is no
        checkpoint of these runs (or none this masq version can read)."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location=device, weights_only=False)
        except Exception as err:  # a file this version cannot read: start over
            warn(f"ignoring the phase checkpoint {self.path} ({type(err).__name__})")
            return None
        ok = (
            isinstance(saved, dict)
            and saved.get("format") == FORMAT
            and saved.get("version") == __version__
            and saved.get("key") == self.key
        )
        if not ok:
            return None
        if self.say is not None:
            self.say(f"resuming after phase {int(saved['phase']) + 1} from {self.path}")
        return int(saved["phase"]), saved["state"]

    def save(self, phase: int, state: dict[str, Any], last: bool = False) -> None:
        """Keep ``state`` as the loop's state after ``phase`` (0-based), unless the last save
        was less than ``every`` seconds ago or this is the ``last`` phase (its records are
        about to be stored). A failed write (disk full) warns once and saves no more."""
        now = time.perf_counter()
        if last or self._broken or now - self._last < self.every:
            return
        buffer = io.BytesIO()
        saved = {"format": FORMAT, "version": __version__, "key": self.key}
        torch.save({**saved, "phase": phase, "state": state}, buffer, pickle_module=_Pickle)
        try:
            atomic_write(self.path, buffer.getbuffer())  # a view: no second copy in memory
        except OSError as err:
            self._broken = True
            warn(f"no phase checkpoints for these runs: {err}")
            return
        self._last = time.perf_counter()

    def clear(self) -> None:
        """Delete the checkpoint (the runs are stored)."""
        self.path.unlink(missing_ok=True)


def checkpoint_key(run_ids: Sequence[str]) -> str:
    """The name of the checkpoint of the runs ``run_ids`` trained together: the sha256 of
    their ids in order, 20 hex digits."""
    return hashlib.sha256(",".join(run_ids).encode("ascii")).hexdigest()[:20]


def phase_checkpoint(
    root: Path,
    run_ids: Sequence[str],
    every: float = 0.0,
    say: Callable[[str], None] | None = None,
) -> PhaseCheckpoint:
    """The checkpoint of the runs ``run_ids`` (trained together) in the results dir ``root``:
    ``root/phases/<key>.pt``."""
    key = checkpoint_key(run_ids)
    return PhaseCheckpoint(Path(root) / PHASES_DIR / f"{key}.pt", key, every, say)


def checkpoints_left(root: Path) -> tuple[int, int]:
    """(how many phase checkpoints, their bytes) in the results dir ``root``: after a grid
    whose runs all ended, those of other grids' stopped runs."""
    sizes = []
    for path in (Path(root) / PHASES_DIR).glob("*.pt"):
        try:
            sizes.append(path.stat().st_size)
        except OSError:  # deleted meanwhile
            continue
    return len(sizes), sum(sizes)


__all__ = [
    "PHASES_DIR",
    "PhaseCheckpoint",
    "checkpoint_key",
    "checkpoints_left",
    "phase_checkpoint",
    "read_only",
]
