"""What the loader needs from a dataset: length, labels, and one sample's source."""

from __future__ import annotations

import numpy as np

from hpcsgd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomResizedCrop, ResizeCenterCrop


class Dataset:
    """Base class. Subclasses set the attributes and implement :meth:`source`.

    Attributes:
        channels: channels of every sample after decoding (1 or 3).
        image_hw: ``(H, W)`` when every sample has that size (arrays), ``None`` for files.
        mean, std: per-channel normalization constants in 0..255 units.
        labels: ``int32`` array, one class index per sample.
        n_classes: number of classes.
    """

    channels: int = 3
    image_hw: tuple[int, int] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    labels: np.ndarray
    n_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def source(self, i: int):
        """Sample ``i`` as a file path (str) or a ``uint8`` array ``(H, W, C)``."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """How messages name sample ``i`` (a file path for file datasets)."""
        src = self.source(i)
        return src if isinstance(src, str) else f"{type(self).__name__}[{i}]"

    def default_transform(self, mode: str):
        """The transform that ``transform='train'`` / ``'eval'`` means for this dataset."""
        if mode == "train":
            return RandomResizedCrop()
        return ResizeCenterCrop()
