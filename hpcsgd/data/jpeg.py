"""Opening image files robustly, and the reduced-size JPEG decode fast path.

Any file Pillow can identify is accepted whatever its extension (a PNG saved
as ``.JPEG`` occurs in real ImageNet copies), and any mode is converted to RGB:
grayscale (L, I;16), CMYK (including Adobe's inverted CMYK, which Pillow's
JPEG decoder handles), palette and alpha images (alpha dropped).

Fast paths, both measured in ``benchmarks/loader.py``:

* Reduced-size decode: for a JPEG whose crop will be scaled down to ``out``
  pixels, libjpeg is asked (Pillow's ``draft()``, or turbojpeg's scaling
  factors) to decode at 1/2, 1/4 or 1/8 scale in the DCT domain, as long as
  the crop stays at least ``out`` pixels in both directions, so no output
  detail is lost. It pays only for crops at least twice the output size
  (large images, or eval resizing of images over 512 px).
* Decoder: Pillow by default. ``decoder='simplejpeg'`` (or ``'auto'``: use it
  when importable) decodes baseline JPEGs with the optional ``simplejpeg``
  package (libjpeg-turbo's TurboJPEG API, ``pip install simplejpeg``);
  anything else (PNG, CMYK, a file it rejects) still goes to Pillow, which
  also produces the error messages. Both use libjpeg-turbo; measured, the
  difference is within this machine's noise (docs/data.md), hence the default.
"""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from hpcsgd.errors import ConfigError, DataError

try:  # optional libjpeg-turbo binding
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

DECODERS = ("auto", "pillow", "simplejpeg")


def check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ConfigError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "simplejpeg" and simplejpeg is None:
        raise ConfigError("decoder='simplejpeg' needs the simplejpeg package: pip install simplejpeg")

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError,
                  Image.DecompressionBombError, EOFError, IndexError, struct.error)


def open_image(path: str) -> Image.Image:
    """Open ``path`` lazily (header only); DataError naming the file if it can't be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except PermissionError as e:
        raise DataError(f"{path}: permission denied") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: is a directory, not an image") from e
    except (*_DECODE_ERRORS, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode (if lazy) and convert any Pillow mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        scale = 257 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1
        arr8 = np.clip(arr // scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "F":
        arr8 = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def draft_scale_for(size: tuple[int, int], crop_w: float, crop_h: float,
                    out_w: int, out_h: int) -> tuple[int, int]:
    """The ``draft()`` request that keeps a ``crop_w x crop_h`` crop >= ``out_w x out_h`` pixels.

    Pillow picks the largest reduction ``s in {8,4,2,1}`` with
    ``s <= min(W // req_w, H // req_h)``; requesting ``req = ceil(W * out / crop)``
    guarantees ``crop / s >= out``.
    """
    w, h = size
    return (max(1, math.ceil(w * out_w / max(crop_w, 1e-9))),
            max(1, math.ceil(h * out_h / max(crop_h, 1e-9))))


def open_for_crop(path: str, box: tuple[float, float, float, float] | None, out_wh: tuple[int, int],
                  *, size: tuple[int, int] | None = None, img: Image.Image | None = None,
                  draft: bool = True) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Decode ``path`` (or the already opened lazy ``img``) to RGB for cropping ``box``.

    ``box`` is ``(x0, y0, x1, y1)`` in original pixels (None: the whole image),
    ``out_wh`` the size the crop will be resized to. Returns the decoded RGB
    image and ``box`` mapped to its (possibly reduced) pixel grid.
    """
    if img is None:
        img = open_image(path)
    w, h = size or img.size
    if box is None:
        box = (0.0, 0.0, float(w), float(h))
    try:
        sx = sy = 1.0
        if draft and img.format == "JPEG":
            req = draft_scale_for((w, h), box[2] - box[0], box[3] - box[1], *out_wh)
            res = img.draft("RGB", req)
            if res is not None:  # the DCT scale is exact: 1/s, whatever the rounded-up pixel count
                sx, sy = res[1][2] / w, res[1][3] / h
        rgb = to_rgb(img)
        rgb.load()
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    except MemoryError as e:
        raise DataError(f"{path}: out of memory while decoding ({w}x{h} pixels)") from e
    return rgb, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except PermissionError as e:
        raise DataError(f"{path}: permission denied") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: is a directory, not an image") from e
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from e


def _turbo_decode(data: bytes, box_of, out_wh, draft: bool):
    """Decode with simplejpeg; None when it can't (not a JPEG, CMYK, damaged: Pillow decides)."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, TypeError):
        return None
    if colorspace not in ("RGB", "YCbCr", "Gray"):
        return None
    box = box_of(w, h)
    f = max(out_wh[0] / max(box[2] - box[0], 1e-9), out_wh[1] / max(box[3] - box[1], 1e-9))
    kw = {}
    if draft and f <= 0.5:  # only the SIMD-accelerated reductions (1/2, 1/4, 1/8) pay
        kw = {"min_width": math.ceil(w * f), "min_height": math.ceil(h * f)}
    try:
        arr = simplejpeg.decode_jpeg(data, "RGB", **kw)
    except (ValueError, RuntimeError):
        return None
    scale = arr.shape[1] / w
    for m in range(1, 17):  # TurboJPEG scales by m/8 and rounds the size up
        if math.ceil(w * m / 8) == arr.shape[1] and math.ceil(h * m / 8) == arr.shape[0]:
            scale = m / 8
            break
    return Image.fromarray(arr, "RGB"), tuple(v * scale for v in box)


def decode_for_crop(path: str, box_of, out_wh: tuple[int, int], *, draft: bool = True,
                    decoder: str = "auto") -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Decode ``path`` to RGB for the crop ``box_of(width, height)`` that becomes ``out_wh`` pixels.

    Returns the decoded image (possibly DCT-reduced) and the crop box in its pixels.
    """
    if decoder != "pillow" and simplejpeg is not None:
        data = _read_bytes(path)
        if data[:2] == b"\xff\xd8":
            done = _turbo_decode(data, box_of, out_wh, draft)
            if done is not None:
                return done
    img = open_image(path)
    return open_for_crop(path, box_of(*img.size), out_wh, img=img, draft=draft)
