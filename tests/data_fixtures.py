"""Small image trees for the data tests, generated into temporary folders (never committed).

Every image's content is known: ``smooth_rgb(w, h, seed)`` is a smooth colour
field (JPEG-friendly, so decoded pixels stay within a few levels of the
source), and each special file has a flat, known colour.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# flat colours of the special files and the RGB a correct decoder must give
GRAY_LEVEL = 90
CMYK_VALUE = (0, 255, 255, 0)  # 100% magenta + yellow = red
CMYK_RGB = (255, 0, 0)
PNG_RGB = (20, 200, 60)
PALETTE_RGB = (200, 40, 180)


def smooth_rgb(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth uint8 (h, w, 3) image, different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6.28)
        out[:, :, c] = 127.5 + 100 * np.sin(fx * 6.28 * xx / w + ph) * np.cos(fy * 6.28 * yy / h)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_folder(root: str, classes=("cat", "dog", "eel"), per_class: int = 4, size=(48, 40),
                splits=("train", "val")) -> dict:
    """``root/<split>/<class>/img<i>.JPEG`` RGB JPEGs; returns {path: label} over all splits."""
    labels = {}
    seed = 0
    for split in splits:
        for c, name in enumerate(classes):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                seed += 1
                w = size[0] + (seed % 3) * 8  # varying sizes, like real data
                p = os.path.join(d, f"img{i}.JPEG")
                Image.fromarray(smooth_rgb(w, size[1], seed)).save(p, quality=95)
                labels[p] = c
    return labels


def make_special_files(folder: str, size=(40, 32)) -> dict:
    """Grayscale JPEG, CMYK JPEG, PNG saved as .JPEG, palette PNG as .JPEG; returns {name: expected RGB}."""
    os.makedirs(folder, exist_ok=True)
    w, h = size
    Image.new("L", size, GRAY_LEVEL).save(os.path.join(folder, "gray.JPEG"), quality=95)
    Image.new("CMYK", size, CMYK_VALUE).save(os.path.join(folder, "cmyk.JPEG"), quality=95)
    Image.new("RGB", size, PNG_RGB).save(os.path.join(folder, "png_inside.JPEG"), format="PNG")
    pal = Image.new("P", size, 3)
    pal.putpalette([0, 0, 0] * 3 + list(PALETTE_RGB) + [0, 0, 0] * 252)
    pal.save(os.path.join(folder, "palette.JPEG"), format="PNG")
    return {"gray.JPEG": (GRAY_LEVEL,) * 3, "cmyk.JPEG": CMYK_RGB, "png_inside.JPEG": PNG_RGB,
            "palette.JPEG": PALETTE_RGB}


def truncate(path: str, keep: float = 0.5) -> None:
    """Cut ``path`` to ``keep`` of its bytes (a half-downloaded JPEG)."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def scramble(path: str, seed: int = 0) -> None:
    """Overwrite ``path`` with random bytes (not an image at all)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())


def write_list(path: str, entries, root: str) -> None:
    """A Chainer-style ``relpath label`` list file."""
    with open(path, "w") as f:
        for p, label in entries:
            f.write(f"{os.path.relpath(p, root)} {label}\n")


class ExitingTransform:
    """Identity, except that the worker exits with ``code`` on sample ``index`` (worker-death tests)."""

    def __init__(self, index: int, code: int = 3, hang: bool = False):
        self.index, self.code, self.hang = index, code, hang

    def output_hw(self, hw):
        return tuple(hw)

    def __call__(self, sample, rng):
        if int(sample[0, 0, 0]) == self.index:
            if self.hang:
                import time

                time.sleep(3600)
            os._exit(self.code)
        return sample


def index_images(n: int, hw=(4, 4)) -> np.ndarray:
    """uint8 (n, h, w, 1) images whose first pixel is ``i % 256`` (which sample was delivered)."""
    img = np.zeros((n, *hw, 1), np.uint8)
    img[:, 0, 0, 0] = np.arange(n) % 256
    return img
