"""OpenMP's wait policy for the command line, chosen from measurements (torch-free).

OpenMP threads that spin while waiting slow training 5-9x when other work shares the cores
(measured: 800-800 net, 76 ms vs 11 ms per iteration), but passive waiting costs a single
user on an idle machine 1.65x in fp32 and 2.3x in bf16 (784-800-800-10, 2 threads). Grids run
one thread per worker, where the policy does not matter. So: PASSIVE only when other work is
running on the cores now, and a user's own ``OMP_WAIT_POLICY`` always wins.

"Now" is the kernel's count of runnable threads (``procs_running`` of /proc/stat, this
process's own thread taken off), the median of three looks 5 ms apart. The 1-minute load
average, used before, still counts a previous command's own load: back-to-back runs on an idle
machine went passive and ran 1.35-1.9x slower. The policy a run used is in its record
(``meta["omp_wait_policy"]``, :func:`masq.protocol.result.run_meta`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping

STAT = "/proc/stat"


def runnable_threads(stat_text: str) -> int | None:
    """``procs_running`` of a /proc/stat text (the threads runnable now, this one included),
    None when the line is missing."""
    for line in stat_text.splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    return None


def others_running(looks: int = 3, pause: float = 0.005) -> float | None:
    """The median over ``looks`` reads of /proc/stat, ``pause`` seconds apart, of the threads
    runnable besides this one; None where /proc/stat cannot be read (not Linux)."""
    counts = []
    for look in range(looks):
        if look:
            time.sleep(pause)
        try:
            with open(STAT, encoding="ascii") as f:
                running = runnable_threads(f.read())
        except OSError:
            return None
        if running is None:
            return None
        counts.append(max(0, running - 1))
    return statistics.median(counts)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def oversubscribed() -> bool:
    """Whether other threads now runnable fill every usable core (:func:`others_running`;
    where that cannot be read: the 1-minute load average, else False)."""
    others = others_running()
    if others is not None:
        return others >= usable_cores()
    try:
        return os.getloadavg()[0] >= usable_cores()
    except (OSError, AttributeError):  # pragma: no cover
        return False


def wait_policy_env(
    environ: Mapping[str, str] | None = None, busy: bool | None = None
) -> dict[str, str]:
    """The environment to add: ``{"OMP_WAIT_POLICY": "PASSIVE"}`` when the machine is
    oversubscribed and ``environ`` (default: this process's) sets no policy, else {}."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"} if (oversubscribed() if busy is None else busy) else {}
