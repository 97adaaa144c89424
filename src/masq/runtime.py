"""Where and how computations run: device resolution, thread setup, output directories.

``resolve_device("auto")`` is CUDA when a GPU is visible and the CPU otherwise;
``"cuda"`` (or ``"cuda:N"``) without a GPU is a one-line :class:`ConfigError`.
Output directories are checked (created, a file created in them) before any work starts:
:func:`check_out_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from masq.config import check_device_name
from masq.errors import ConfigError
from masq.fileio import out_dir_message, writable_dir


def cpu_count() -> int:
    """The cores this process may use (its CPU affinity; all cores where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    """The torch threads of each of ``workers`` local workers: the cores shared out, at
    least one."""
    return max(1, cpu_count() // workers)


def resolve_device(name: str = "auto") -> torch.device:
    """ "cpu" | "cuda" | "cuda:N" | "auto" -> a torch.device that exists on this machine."""
    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if not has_cuda:
        raise ConfigError(f"device {name!r}: no CUDA GPU is visible here; use --device cpu or auto")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible; "
            "pick an index below that"
        )
    return device


def setup_threads(threads: int | None = None) -> int:
    """Set PyTorch's intra-op thread count (``None`` keeps the default); returns the count."""
    if threads is not None:
        if threads <= 0:
            raise ConfigError(f"threads: must be a positive integer, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as an output directory, created and proven writable before any work starts;
    a one-line ConfigError naming ``flag`` otherwise (an existing file, a path under a regular
    file, a directory this user cannot write to)."""
    try:
        return writable_dir(path)
    except OSError as err:
        raise ConfigError(out_dir_message(path, err, flag)) from None
