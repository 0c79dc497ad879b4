"""In-memory array datasets: user arrays and synthetic random tensors (no I/O)."""

from __future__ import annotations

import numpy as np

from hpcsgd.data.datasets.base import Dataset
from hpcsgd.data.transforms import Identity, PadRandomCrop
from hpcsgd.errors import ConfigError


class ArrayDataset(Dataset):
    """``images`` uint8 of shape (N, H, W), (N, H, W, C) or, with ``layout='NCHW'``, (N, C, H, W)."""

    def __init__(self, images: np.ndarray, labels, n_classes: int | None = None, layout: str = "NHWC",
                 mean=(127.5,), std=(73.9,)):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ConfigError(f"ArrayDataset wants uint8 images, got {images.dtype}")
        if images.ndim == 3:
            images = images[:, :, :, None]
        elif images.ndim == 4 and layout == "NCHW":
            images = images.transpose(0, 2, 3, 1)
        elif images.ndim != 4:
            raise ConfigError(f"images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {images.shape}")
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int32)
        if len(self.labels) != len(self.images):
            raise ConfigError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.n_classes = int(n_classes if n_classes is not None else self.labels.max(initial=-1) + 1)
        self.channels = self.images.shape[3]
        self.image_hw = self.images.shape[1:3]
        self.mean, self.std = tuple(mean), tuple(std)

    def source(self, i: int) -> np.ndarray:
        return self.images[i]

    def default_transform(self, mode: str):
        return PadRandomCrop() if mode == "train" else Identity()


class SyntheticDataset(Dataset):
    """``n`` random uint8 tensors of ``shape`` (C, H, W) or (H, W), labels uniform in ``n_classes``.

    Deterministic from ``seed``; only a pool of ``pool`` distinct images is kept
    (sample ``i`` is pool image ``i % pool``) so any ``n`` costs no memory or I/O.
    Normalized output has roughly zero mean and unit variance.
    """

    def __init__(self, shape=(3, 224, 224), n_classes: int = 1000, n: int = 1281167, seed: int = 0,
                 pool: int = 64):
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"synthetic shape must be (C, H, W) or (H, W), got {shape}")
        if n < 1 or n_classes < 1:
            raise ConfigError(f"synthetic n ({n}) and n_classes ({n_classes}) must be >= 1")
        self.shape, self.n, self.seed, self.pool = shape, int(n), int(seed), max(1, min(int(pool), int(n)))
        self.n_classes = int(n_classes)
        self.channels = shape[0]
        self.image_hw = shape[1:]
        self.mean, self.std = (127.5,), (73.9,)  # uniform 0..255: std = 255 / sqrt(12)
        rng = np.random.default_rng([self.seed, 1])
        self.labels = rng.integers(0, self.n_classes, size=self.n, dtype=np.int32)
        self._images = None

    def __getstate__(self):  # workers regenerate the pool instead of receiving it
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def _pool(self) -> np.ndarray:
        if self._images is None:
            c, h, w = self.shape
            rng = np.random.default_rng([self.seed, 2])
            self._images = rng.integers(0, 256, size=(self.pool, h, w, c), dtype=np.uint8)
        return self._images

    def source(self, i: int) -> np.ndarray:
        return self._pool()[i % self.pool]

    def default_transform(self, mode: str):
        return Identity()
