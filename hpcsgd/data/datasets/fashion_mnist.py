"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

Looks in ``/usr/share/datasets/fashion-mnist`` by default (any folder may be
given) for ``train-images-idx3-ubyte[.gz]`` / ``train-labels-idx1-ubyte[.gz]``
(split 'train') and ``t10k-*`` (split 'test' or 'val'); gzip or raw files.
Images are 28x28 uint8, one channel, 10 classes.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from hpcsgd.data.datasets.arrays import ArrayDataset
from hpcsgd.errors import ConfigError, DataError

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
HOW_TO_GET = ("install it with `apt-get install dataset-fashion-mnist` (files go to "
              f"{DEFAULT_PATH}), pass the folder holding the IDX files, or use "
              "build_dataset('synthetic', ...) for data without files")
PREFIX = {"train": "train", "test": "t10k", "val": "t10k", "eval": "t10k"}
MEAN, STD = (72.94,), (90.02,)  # 0.2860 and 0.3530 in 0..255 units (training set)


def _find(folder: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return p
    raise DataError(f"Fashion-MNIST file {os.path.join(folder, stem)}[.gz] not found; {HOW_TO_GET}")


def read_idx(path: str, expect_ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip detected from its magic bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            data = gzip.decompress(f.read()) if head == b"\x1f\x8b" else f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable IDX file ({type(e).__name__}: {e})") from e
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expect_ndim:
        raise DataError(f"{path}: not an IDX uint8 file with {expect_ndim} dimensions "
                        f"(magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    count = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != count:
        raise DataError(f"{path}: truncated IDX file: header says {dims} = {count} bytes, "
                        f"found {body.size}")
    return body.reshape(dims)


class FashionMNIST(ArrayDataset):
    """Fashion-MNIST split ``split`` from ``path``; workers re-read the files instead of being sent them."""

    def __init__(self, path: str | None = None, split: str = "train"):
        if split not in PREFIX:
            raise ConfigError(f"Fashion-MNIST split must be one of {sorted(PREFIX)}, got {split!r}")
        self.path, self.split = path or DEFAULT_PATH, split
        if not os.path.isdir(self.path):
            raise DataError(f"Fashion-MNIST folder {self.path} not found; {HOW_TO_GET}")
        self._load()

    def _load(self) -> None:
        prefix = PREFIX[self.split]
        images = read_idx(_find(self.path, f"{prefix}-images-idx3-ubyte"), 3)
        labels = read_idx(_find(self.path, f"{prefix}-labels-idx1-ubyte"), 1)
        if len(images) != len(labels):
            raise DataError(f"{self.path}: {len(images)} {prefix} images but {len(labels)} labels")
        super().__init__(images, labels, n_classes=10, mean=MEAN, std=STD)

    def __getstate__(self):
        return {"path": self.path, "split": self.split}

    def __setstate__(self, state):
        self.path, self.split = state["path"], state["split"]
        self._load()
