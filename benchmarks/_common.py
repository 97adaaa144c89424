"""Small helpers shared by the benchmark scripts: threads, peak memory, child processes, tables.

Peak memory of a PyTorch computation is best measured as the peak resident set size (RSS) of a
process that runs nothing else: tracemalloc does not see torch's allocations. The pattern is::

    # parent                                       # child (the same script, --child ...)
    result = run_child([script, "--child", m])     pin_threads(n)
                                                   ... load data, build the model ...
                                                   stats, _ = measure(work)
                                                   emit(stats | {"method": m})

``measure`` resets the kernel's peak-RSS mark before the work where Linux allows it
(/proc/self/clear_refs), so ``delta_mib`` is the work's own peak above what the process held
when it started; elsewhere it falls back to getrusage's lifetime maximum (an upper bound).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_RESULT_PREFIX = "BENCH-RESULT "


def pin_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads: torch.set_num_threads here, and the OpenMP/BLAS
    variables in the environment, which child processes inherit (run_child sets them too)."""
    import torch

    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return peak_rss_mib()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process (since the last reset), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure(work: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Run ``work()`` once; return (wall seconds, RSS at the start, peak RSS and its rise over
    the start, in MiB; work's return value)."""
    import gc

    gc.collect()
    exact_peak = reset_peak_rss()
    base = current_rss_mib()
    start = time.perf_counter()
    value = work()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    stats = {
        "seconds": seconds,
        "base_rss_mib": base,
        "peak_rss_mib": peak,
        "delta_mib": peak - base,
        "peak_is_lifetime": not exact_peak,
    }
    return stats, value


def emit(result: dict[str, Any]) -> None:
    """Print a child's result as one JSON line for :func:`run_child`."""
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(argv: Sequence[str], threads: int, python: str | None = None) -> dict[str, Any]:
    """Run ``python argv...`` (default: this interpreter) in a fresh process with ``threads``
    threads; return its result."""
    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    python = python or sys.executable
    proc = subprocess.run([python, *argv], capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {python} {' '.join(argv)} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(_RESULT_PREFIX) :])


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, header) ``columns``; floats get 4 significant
    digits (or are printed as given when already strings), missing values a dash."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(key)) for key, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line, rule]
    out += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    return "\n".join(out)


def print_table(
    title: str, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]
) -> None:
    """Print a title line and :func:`format_table`."""
    print(f"\n{title}\n")
    print(format_table(rows, columns), flush=True)


D1_CLASSES = 5
SYNTHETIC_SAMPLES = 28_000


def load_d1(synthetic: bool) -> tuple[Any, Any, str]:
    """(x [N, 784] float32 in [0, 1], y [N], a note on the source) for D1 of D5-5 (MNIST
    classes 0-4); uniform random images of the same shape where MNIST cannot be loaded (or
    ``synthetic``), which the note says."""
    import torch

    from masq.errors import MasqError

    reason = "--synthetic given"
    if not synthetic:
        try:
            from masq import data

            train = data.load("mnist").train
            keep = train.labels < D1_CLASSES
            x = torch.from_numpy(train.images[keep]).reshape(-1, 784).float() / 255.0
            y = torch.from_numpy(train.labels[keep]).long()
            return x, y, f"MNIST D1 of D5-5 (classes 0-4 of the {len(train)}-image training split)"
        except (AttributeError, ImportError, OSError, ValueError, MasqError) as err:
            reason = f"MNIST unavailable ({type(err).__name__}: {err})"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(SYNTHETIC_SAMPLES, 784, generator=g)
    y = torch.randint(0, D1_CLASSES, (SYNTHETIC_SAMPLES,), generator=g)
    return x, y, f"SYNTHETIC uniform random images, {SYNTHETIC_SAMPLES} samples: {reason}"
