"""IDX files: the format of the MNIST and Fashion-MNIST releases, read and written.

An IDX file is the magic ``00 00 TT D`` (TT the item type, D the number of dims), D
big-endian uint32 dims, then the items, big-endian. A release is four such files
(:data:`IDX_NAMES`), held in memory as a :class:`RawIdx`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from masq.errors import DataError

__all__ = ["IDX_NAMES", "RawIdx", "check_shapes", "idx_bytes", "parse_idx", "read_idx"]

#: The four files of the official releases (MNIST and Fashion-MNIST use the same names).
IDX_NAMES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

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


def check_shapes(raw: RawIdx, where: Mapping[str, str]) -> None:
    """Images uint8 [N, 28, 28] and labels uint8 [N], with N equal within each pair.

    ``where`` maps each of :data:`IDX_NAMES` to the file or URL it came from (for messages).
    """
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
