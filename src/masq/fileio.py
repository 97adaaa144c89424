"""File writes shared by the data cache, the result store and the command line (imports
nothing of masq): atomic writes, a writability check done before any work, a rescue
location for a finished result whose own location failed, an exclusive lock, a directory
replaced by a new one with a commit step, and tensor files (safetensors) checked against a
sidecar."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESCUE_PREFIX = "masq-rescued"
TENSORS_FORMAT = "masq-tensors"


def atomic_write(path: str | os.PathLike[str], data: str | bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file beside it, fsync, then ``os.replace``.

    A reader never sees a half-written file, and an interruption (Ctrl-C, ``kill -9``) leaves
    either the old file or the new one. A failing write (disk full, quota, read-only file
    system) removes the temporary file and raises an OSError naming ``path`` (:func:`naming`).
    The file is made readable by all (``0o644``), since caches and result directories may be
    shared. ``str`` data is written as UTF-8.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise naming(err, target) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise naming(err, target) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def naming(err: OSError, target: Path) -> OSError:
    """``err`` (e.g. ENOSPC from a write, whose ``filename`` is None or a temporary file) as an
    OSError of the same class and errno whose ``filename`` is ``target``: what a message
    names (``str(err)``: "[Errno 28] No space left on device: 'PATH'")."""
    if err.filename == str(target) or err.errno is None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(target))


def save_png(fig: Any, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Write the matplotlib figure ``fig`` as PNG (``dpi`` dots per inch) to ``path``
    atomically: the one PNG saver of masq."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write(path, buffer.getvalue())


def warn(message: str) -> None:
    """One line ``masq: warning: <message>`` on stderr."""
    print(f"masq: warning: {message}", file=sys.stderr, flush=True)


def probe_write(directory: Path) -> None:
    """Create and remove a temporary file in ``directory``: an OSError when that fails."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".masq-probe.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def writable_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory (created with its parents) in which a file can be created.

    Raises ``NotADirectoryError`` when ``path`` or one of its parents is an existing
    non-directory, and the OSError of the failing step (e.g. ``PermissionError``) otherwise.
    A check, not a guarantee: a later write can still fail (disk full), see :func:`rescue`.
    """
    target = Path(path)
    for parent in (target, *target.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(parent))
    target.mkdir(parents=True, exist_ok=True)
    probe_write(target)
    return target


def rescue_dir(origin: str | os.PathLike[str]) -> Path:
    """The fallback directory of the output location ``origin``: ``<tmp>/masq-rescued/<hash>``
    with ``<hash>`` from the absolute path of ``origin`` (the same for every process writing
    there, so a grid's workers rescue into one place)."""
    digest = hashlib.sha256(str(Path(origin).absolute()).encode("utf-8")).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / RESCUE_PREFIX / f"{Path(origin).name or 'out'}-{digest}"


def rescue(origin: str | os.PathLike[str], relative: str, data: str | bytes) -> Path:
    """Write ``data`` atomically as ``rescue_dir(origin) / relative``; its path. Used when a
    finished result could not be written to ``origin / relative``."""
    return atomic_write(rescue_dir(origin) / relative, data)


def error_text(err: OSError) -> str:
    """``err`` in a few words: its strerror (e.g. "Permission denied") or its message."""
    return err.strerror or str(err) or type(err).__name__


def out_dir_message(path: str | os.PathLike[str], err: OSError, flag: str = "--out") -> str:
    """The one-line message of an output directory ``path`` that :func:`writable_dir` refused."""
    shown = str(path)
    if isinstance(err, NotADirectoryError | FileExistsError):
        culprit = err.filename if err.filename is not None else shown
        if Path(culprit) == Path(shown):
            return f"{flag} {shown!r} is an existing file; give a directory path"
        return f"{flag} {shown!r} is under the regular file {str(culprit)!r}; give a directory path"
    return f"{flag} {shown!r} is not writable ({error_text(err)}); give a writable directory"


class LockHeld(OSError):
    """An exclusive lock is held by another process (``pid``; None when it cannot be read)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by process {pid if pid is not None else '?'}")
        self.path = path
        self.pid = pid


def _holder(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


@contextmanager
def exclusive_lock(
    path: str | os.PathLike[str],
    *,
    wait: bool = False,
    on_wait: Callable[[int | None], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created) for the ``with`` block, its content
    this process's pid. Another holder: :class:`LockHeld`, or (``wait``) ``on_wait(pid)``
    then block until it is free. The kernel drops the lock when the holder exits in any way
    (``kill -9`` included); the descriptor is not inherited by child processes. Without
    ``fcntl`` (not POSIX) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    target = Path(path)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            if not wait:
                raise LockHeld(target, pid) from None
            if on_wait is not None:
                on_wait(pid)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)


def replace_dir(target: Path, staged: Path, backup: Path, commit: Callable[[], object]) -> None:
    """Put the directory ``staged`` in the place of ``target`` (moved to ``backup`` first), then
    call ``commit`` (e.g. an atomic write saying the new content is valid). Any failure or
    interruption up to the end of ``commit`` puts ``target`` back (:func:`restore_dir`, also
    the repair after a ``kill -9``); ``backup`` is removed after the commit."""
    try:
        if target.exists():
            os.rename(target, backup)
        os.rename(staged, target)
        commit()
    except BaseException:
        restore_dir(target, backup)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def restore_dir(target: Path, backup: Path) -> None:
    """Undo a :func:`replace_dir` stopped before its commit: ``backup`` (when there) back in
    the place of ``target``, whatever was moved there dropped."""
    if backup.exists():
        shutil.rmtree(target, ignore_errors=True)
        os.rename(backup, target)


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, Any], meta: Any) -> None:
    """``tensors`` (name -> torch tensor) as a safetensors file ``path`` and ``meta`` (JSON-ready)
    in its sidecar ``path.with_suffix(".json")`` with the file's size and sha256; each written
    atomically, the sidecar last, so an entry is complete once its sidecar matches."""
    from safetensors.torch import save

    target = Path(path)
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write(target, blob)
    sidecar = {
        "format": TENSORS_FORMAT,
        "file": target.name,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "meta": meta,
    }
    atomic_write(target.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """(tensors, meta) written by :func:`write_tensors`. A missing file, a sidecar that is not
    one, a tensor file whose size or sha256 differs from it (truncated,
    changed) or that safetensors cannot read: ValueError saying which."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    target = Path(path)
    for file in (target.with_suffix(".json"), target):
        if not file.exists():
            raise ValueError(f"{file.name} is missing")
    info = json.loads(target.with_suffix(".json").read_text(encoding="utf-8"))
    if not isinstance(info, dict) or info.get("format") != TENSORS_FORMAT:
        raise ValueError(f"{target.with_suffix('.json').name} is not a masq tensor sidecar")
    blob = target.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if len(blob) != info.get("bytes") or digest != info.get("sha256"):
        raise ValueError(
            f"{len(blob)} bytes with sha256 {digest[:12]}..., its sidecar says "
            f"{info.get('bytes')} bytes with sha256 {str(info.get('sha256'))[:12]}...: "
            "truncated or changed"
        )
    try:
        return load(blob), info.get("meta")
    except SafetensorError as err:
        raise ValueError(f"unreadable safetensors ({err})") from None
