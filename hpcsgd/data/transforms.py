"""Augmentations: ImageNet train/eval crops and small-image pad-crop, all on uint8 HWC.

A transform is a picklable callable ``t(sample, rng) -> uint8 array (H, W, C)``
where ``sample`` is either a file path (decoded here, so the JPEG fast path can
see the crop before decoding) or a ``uint8`` array ``(H, W, C)``; ``rng`` is a
``numpy.random.Generator`` (the loader derives it from seed, epoch, batch and
rank, so augmentations are reproducible on resume). ``t.output_hw(hw)`` gives
the output size for input size ``hw`` (``None``: variable-size files).
Normalization to float32 is not a transform: the loader does it while writing
the batch (or on the device, for uint8 batches), see :class:`Normalize`.

The two crop transforms also have ``t.write_into(sample, rng, normalize, out)``,
which the loader prefers: after decoding, one fused kernel
(:mod:`hpcsgd.data.resample`) resizes the crop, flips and normalizes straight
into the batch slot ``out`` (C, H, W). It draws the same random numbers in
the same order as ``t(sample, rng)`` and agrees with it within one 8-bit level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hpcsgd.data.jpeg import check_decoder, decode_for_crop
from hpcsgd.data.resample import resample_into
from hpcsgd.errors import ConfigError, DataError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0.485, 0.456, 0.406 in 0..255 units
IMAGENET_STD = (58.395, 57.12, 57.375)  # 0.229, 0.224, 0.225 in 0..255 units


def _as_pil(sample: np.ndarray) -> Image.Image:
    if sample.ndim == 3 and sample.shape[2] == 1:
        return Image.fromarray(sample[:, :, 0], "L")
    return Image.fromarray(sample)


def _as_hwc(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


@dataclass
class RandomResizedCrop:
    """Inception-style crop: random area fraction ``scale`` and aspect ``ratio``, resized to ``size``.

    Ten tries to draw a box that fits (area ~ U(scale) * W*H, log-aspect ~
    U(log ratio)); otherwise the largest centred box with aspect clamped to
    ``ratio``. Then a horizontal flip with probability 1/2 if ``flip``.
    Bilinear (antialiased) resize; ``draft`` enables the reduced-size JPEG decode.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    draft: bool = True
    decoder: str = "pillow"

    def __post_init__(self):
        check_decoder(self.decoder)

    def output_hw(self, hw):
        return (self.size, self.size)

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Draw the crop box ``(x0, y0, x1, y1)`` in pixels of a ``width x height`` image."""
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                x0 = int(rng.integers(0, width - w + 1))
                y0 = int(rng.integers(0, height - h + 1))
                return (x0, y0, x0 + w, y0 + h)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        x0, y0 = (width - w) // 2, (height - h) // 2
        return (x0, y0, x0 + w, y0 + h)

    def __call__(self, sample, rng: np.random.Generator) -> np.ndarray:
        if isinstance(sample, str):
            rgb, fbox = decode_for_crop(sample, lambda w, h: self.box(w, h, rng), (self.size, self.size),
                                        draft=self.draft, decoder=self.decoder)
            channels = 3
        else:
            channels = sample.shape[2]
            rgb = _as_pil(sample)
            fbox = self.box(rgb.size[0], rgb.size[1], rng)
        out = rgb.resize((self.size, self.size), Image.BILINEAR, box=fbox)
        arr = _as_hwc(out, channels)
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return arr

    def write_into(self, sample, rng: np.random.Generator, normalize, out: np.ndarray) -> None:
        """``normalize.write(self(sample, rng), out)`` fused (module docstring); same random draws."""
        name = sample if isinstance(sample, str) else "sample"
        _check_slot(out, self.size, name)
        if isinstance(sample, str):
            rgb, fbox = decode_for_crop(sample, lambda w, h: self.box(w, h, rng), (self.size, self.size),
                                        draft=self.draft, decoder=self.decoder)
            channels = 3
        else:
            rgb, channels = sample, sample.shape[2]
            fbox = self.box(sample.shape[1], sample.shape[0], rng)
        flip = self.flip and rng.random() < 0.5
        _write_resampled(rgb, channels, fbox, flip, normalize, out, name)


def _write_resampled(rgb, channels: int, fbox, flip: bool, normalize, out: np.ndarray, name) -> None:
    """Resample ``rgb`` (Pillow image or uint8 HWC array) box ``fbox`` into the slot ``out``."""
    src = _as_hwc(rgb, channels) if isinstance(rgb, Image.Image) else rgb
    if src.ndim == 2:
        src = src[:, :, None]
    if src.shape[2] != out.shape[0]:
        raise DataError(f"{name}: sample has {src.shape[2]} channels, the batch wants {out.shape[0]}")
    mean, inv = normalize.per_channel(out.shape[0])
    resample_into(src, fbox, flip, mean.reshape(-1), inv.reshape(-1), out)


def _check_slot(out: np.ndarray, size: int, name) -> None:
    if out.shape[1:] != (size, size):
        raise DataError(f"{name}: the transform makes {size}x{size} images, the batch wants "
                        f"{out.shape[1]}x{out.shape[2]}")


@dataclass
class ResizeCenterCrop:
    """Evaluation: resize the shorter side to ``resize``, then take the centred ``crop`` square.

    Done as one resize of the source box that maps onto the centre crop (same
    pixels as resize-then-crop up to the filter's edge taps).
    """

    resize: int = 256
    crop: int = 224
    draft: bool = True
    decoder: str = "pillow"

    def __post_init__(self):
        check_decoder(self.decoder)
        if self.crop > self.resize:
            raise ConfigError(f"crop ({self.crop}) must not exceed resize ({self.resize})")

    def output_hw(self, hw):
        return (self.crop, self.crop)

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source box (original pixels) that becomes the centre crop."""
        s = self.resize / min(width, height)
        rw, rh = int(round(width * s)), int(round(height * s))
        x0, y0 = (rw - self.crop) // 2, (rh - self.crop) // 2
        sx, sy = width / rw, height / rh
        return (x0 * sx, y0 * sy, (x0 + self.crop) * sx, (y0 + self.crop) * sy)

    def __call__(self, sample, rng: np.random.Generator | None = None) -> np.ndarray:
        if isinstance(sample, str):
            rgb, fbox = decode_for_crop(sample, self.box, (self.crop, self.crop), draft=self.draft,
                                        decoder=self.decoder)
            channels = 3
        else:
            channels = sample.shape[2]
            rgb = _as_pil(sample)
            fbox = self.box(*rgb.size)
        return _as_hwc(rgb.resize((self.crop, self.crop), Image.BILINEAR, box=fbox), channels)

    def write_into(self, sample, rng, normalize, out: np.ndarray) -> None:
        """``normalize.write(self(sample), out)`` fused (module docstring)."""
        name = sample if isinstance(sample, str) else "sample"
        _check_slot(out, self.crop, name)
        if isinstance(sample, str):
            rgb, fbox = decode_for_crop(sample, self.box, (self.crop, self.crop), draft=self.draft,
                                        decoder=self.decoder)
            channels = 3
        else:
            rgb, channels = sample, sample.shape[2]
            fbox = self.box(sample.shape[1], sample.shape[0])
        _write_resampled(rgb, channels, fbox, False, normalize, out, name)


@dataclass
class PadRandomCrop:
    """Small images (CIFAR, Fashion-MNIST): zero-pad by ``pad``, random crop back to size, random flip."""

    pad: int = 4
    flip: bool = True

    def output_hw(self, hw):
        if hw is None:
            raise ConfigError("PadRandomCrop needs fixed-size images (an array dataset)")
        return tuple(hw)

    def __call__(self, sample, rng: np.random.Generator) -> np.ndarray:
        if isinstance(sample, str):
            raise ConfigError("PadRandomCrop works on in-memory arrays, not files")
        h, w = sample.shape[:2]
        p = self.pad
        dy, dx = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
        out = np.zeros_like(sample)
        # source window [dy-p, dy-p+h) x [dx-p, dx-p+w) of the unpadded image
        sy0, sx0 = max(dy - p, 0), max(dx - p, 0)
        sy1, sx1 = min(dy - p + h, h), min(dx - p + w, w)
        out[sy0 - (dy - p):sy1 - (dy - p), sx0 - (dx - p):sx1 - (dx - p)] = sample[sy0:sy1, sx0:sx1]
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return out


@dataclass
class Identity:
    """No augmentation (arrays pass through; files are fully decoded and must share one size)."""

    def output_hw(self, hw):
        if hw is None:
            raise ConfigError("files of varying size need a cropping transform ('train' or 'eval')")
        return tuple(hw)

    def __call__(self, sample, rng=None) -> np.ndarray:
        if isinstance(sample, str):
            rgb, _ = decode_for_crop(sample, lambda w, h: (0, 0, w, h), (1, 1), draft=False)
            return np.asarray(rgb)
        return sample


@dataclass
class Normalize:
    """Per-channel ``(x - mean) / std`` in 0..255 units, written straight into a float32 CHW slot."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ConfigError(f"bad normalization mean={self.mean} std={self.std}")

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``mean`` and ``1/std`` for ``channels`` channels (a single value is broadcast)."""
        cache = self.__dict__.setdefault("_cache", {})
        if channels not in cache:
            mean = np.resize(np.asarray(self.mean, np.float32), channels)[:, None, None]
            inv = (1.0 / np.resize(np.asarray(self.std, np.float64), channels)).astype(np.float32)
            cache[channels] = (mean, inv[:, None, None])
        return cache[channels]

    def write(self, hwc: np.ndarray, out_chw: np.ndarray) -> None:
        """Write the normalized image ``hwc`` (uint8) into ``out_chw`` (float32 or uint8)."""
        src = hwc.transpose(2, 0, 1)
        if out_chw.dtype == np.uint8:
            np.copyto(out_chw, src)
            return
        mean, inv = self.per_channel(src.shape[0])
        np.subtract(src, mean, out=out_chw, dtype=np.float32)
        out_chw *= inv

    def apply(self, x):
        """Normalize a uint8 batch ``(N, C, H, W)`` (NumPy or CuPy) to float32, on its own device."""
        try:
            import cupy

            xp = cupy.get_array_module(x)
        except ImportError:
            xp = np
        mean, inv = (xp.asarray(a)[None] for a in self.per_channel(x.shape[1]))
        return (x.astype(xp.float32) - mean) * inv
