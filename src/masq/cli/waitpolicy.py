"""OpenMP's wait policy for the command line, chosen from measurements (torch-free).

OpenMP threads that spin while waiting slow training 5-9x when other work shares the cores
(measured: 800-800 net, 76 ms vs 11 ms per iteration), but passive waiting costs a single
user on an idle machine 1.65x in fp32 and 2.3x in bf16 (784-800-800-10, 2 threads). Grids run
one thread per worker, where the policy does not matter. So: PASSIVE only on an
oversubscribed machine, and a user's own ``OMP_WAIT_POLICY`` always wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def oversubscribed() -> bool:
    """Whether the 1-minute load average is at least the number of usable cores."""
    try:
        return os.getloadavg()[0] >= len(os.sched_getaffinity(0))
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def wait_policy_env(environ: Mapping[str, str] | None = None, busy: bool | None = None) -> dict:
    """The environment to add: ``{"OMP_WAIT_POLICY": "PASSIVE"}`` when the machine is
    oversubscribed and ``environ`` (default: this process's) sets no policy, else {}."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"} if (oversubscribed() if busy is None else busy) else {}
