"""Where and how computations run: device resolution, thread setup, output directories.

``resolve_device("auto")`` is CUDA when a GPU is visible and the CPU otherwise;
``"cuda"`` (or ``"cuda:N"``) without a GPU is a one-line :class:`ConfigError`, and so is a
library call's ``device=`` that torch does not know or this machine lacks (:func:`torch_device`).
Output directories are checked (created, a file created in them) before any work starts:
:func:`check_out_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from masq.config import check_device_name
from masq.errors import ConfigError
from masq.fileio import out_dir_message, writable_dir

if TYPE_CHECKING:  # torch loads when a function here needs it, not with the CLI's --help
    import torch


COMPILE_ENV = "MASQ_COMPILE_STEP"
"""Set to 1 (``masq grid --compile-step``) to run the stacked CPU engine's penalty and Adam
as one compiled step (:mod:`masq.stacked.adam`); an execution choice like the thread count,
recorded in a stacked record's ``meta["compiled_step"]``, not in its run id. The environment
carries it to a grid's workers (and to Ray's, :func:`masq.grid.connect.connect_ray`)."""


def compile_step_requested() -> bool:
    """Whether :data:`COMPILE_ENV` asks for the compiled step."""
    return os.environ.get(COMPILE_ENV, "") not in ("", "0")


def cpu_count() -> int:
    """The cores this process may use (its CPU affinity; all cores where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor: on Linux the first "model name" of ``cpuinfo`` with its family and
    model numbers (e.g. "AMD EPYC (family 26, model 2)"; a virtual machine's name may not tell
    generations apart, the numbers do); elsewhere :func:`platform.processor`; "unknown" where
    neither says. Float results of the same code on the same data can differ between
    processors (their kernels round differently), so records name it."""
    import platform

    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block ends
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def default_threads(workers: int) -> int:
    """The torch threads of each of ``workers`` local workers: the cores shared out, at
    least one."""
    return max(1, cpu_count() // workers)


def resolve_device(name: str = "auto") -> torch.device:
    """ "cpu" | "cuda" | "cuda:N" | "auto" -> a torch.device that exists on this machine."""
    import torch

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


def torch_device(device: torch.device | str) -> torch.device:
    """The ``device=`` of a library call as a torch.device usable here; a one-line ConfigError
    for a name torch does not know or a CUDA device this machine lacks (on a CPU-only torch:
    "CUDA is not available in this torch build; use device='cpu'")."""
    import torch

    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device={device!r}: not a torch device; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    shown = f"device={str(device)!r}"
    if target.type != "cuda":
        return target
    if not torch.backends.cuda.is_built():
        raise ConfigError(f"{shown}: CUDA is not available in this torch build; use device='cpu'")
    if not torch.cuda.is_available():
        raise ConfigError(f"{shown}: no CUDA GPU is visible here; use device='cpu'")
    count = torch.cuda.device_count()
    if target.index is not None and target.index >= count:
        raise ConfigError(f"{shown}: only {count} CUDA device(s) visible; pick an index below")
    return target


def setup_threads(threads: int | None = None) -> int:
    """Set PyTorch's intra-op thread count (``None`` keeps the default); returns the count."""
    import torch

    if threads is not None:
        if threads <= 0:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
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
