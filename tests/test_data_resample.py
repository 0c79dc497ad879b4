"""Fused crop-resize-flip-normalize kernel vs Pillow's resize (the reference) and the unfused transforms."""

import numpy as np
import pytest
from PIL import Image

from hpcsgd.data import Normalize, RandomResizedCrop, ResizeCenterCrop
from hpcsgd.data.resample import _taps, resample_into
from hpcsgd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hpcsgd.errors import DataError

BOXES = [(0, 0, 500, 375), (50.3, 40.2, 400.7, 330.1), (100, 100, 180, 160), (0.5, 0.25, 37.5, 41.0),
         (480, 350, 500, 375)]


def photo(h=375, w=500, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 128 + 80 * np.sin(xx / 17.0)[:, :, None] * np.cos(yy / 23.0)[:, :, None] * rng.uniform(0.5, 1, 3)
    return np.clip(img + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def filter_taps(in_size: int, out_size: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Separable bilinear taps mapping input span ``[lo, hi)`` (pixels) onto ``out_size`` pixels.

    Returns ``(first, weights)``: ``first[o]`` is the first input pixel of
    output ``o`` (int32), ``weights[o, k]`` the weight of input ``first[o] + k``
    (float32, rows sum to 1, zero-padded to the widest filter).
    """
    scale = (hi - lo) / out_size
    support = max(scale, 1.0)  # triangle half-width in input pixels (1 for upscaling)
    centre = lo + (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.floor(centre - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.floor(centre + support + 0.5), in_size).astype(np.int64)
    taps = int(max(1, (last - first).max()))
    k = first[:, None] + np.arange(taps)[None, :]
    w = np.maximum(1.0 - np.abs((k + 0.5 - centre[:, None]) / support), 0.0)
    w[k >= last[:, None]] = 0.0
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
    # Keep every tap inside the image (no bounds test in the kernel): where the padded filter
    # runs past the edge, start it earlier and shift its weights right (the pad is zeros).
    shift = np.maximum(first + taps - in_size, 0)
    j = np.arange(taps)[None, :] - shift[:, None]
    w = np.where(j >= 0, np.take_along_axis(w, np.maximum(j, 0), axis=1), 0.0)
    return (first - shift).astype(np.int32), w.astype(np.float32)


@pytest.mark.parametrize("size,lo,hi", [(500, 50.3, 400.7), (375, 0, 375), (28, 3.0, 9.0),
                                        (500, 490.0, 500.0)])
def test_taps_sum_to_one_stay_inside_and_match_numba(size, lo, hi):
    first, w = filter_taps(size, 224, lo, hi)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert first.min() >= 0 and first.max() + w.shape[1] <= size
    for flip in (False, True):
        f2, w2 = _taps(size, 224, float(lo), float(hi), flip)
        if flip:
            f2, w2 = f2[::-1], w2[::-1]
        np.testing.assert_array_equal(f2, first)
        np.testing.assert_allclose(w2, w, atol=1e-6)


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("flip", [False, True])
def test_uint8_output_matches_pillow_within_one_level(box, flip):
    src = photo()
    out = np.empty((3, 224, 224), np.uint8)
    resample_into(src, box, flip, np.zeros(3, np.float32), np.ones(3, np.float32), out)
    ref = np.asarray(Image.fromarray(src).resize((224, 224), Image.BILINEAR, box=box)).transpose(2, 0, 1)
    if flip:
        ref = ref[:, :, ::-1]
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.3


def test_float_output_is_normalized_pillow_and_grayscale_works():
    src = photo()[:, :, :1].copy()
    norm = Normalize((100.0,), (50.0,))
    out = np.empty((1, 64, 48), np.float32)
    mean, inv = norm.per_channel(1)
    resample_into(src, (10, 20, 300, 200), False, mean.reshape(-1), inv.reshape(-1), out)
    ref = np.asarray(Image.fromarray(src[:, :, 0]).resize((48, 64), Image.BILINEAR, box=(10, 20, 300, 200)))
    np.testing.assert_allclose(out[0], (ref - 100.0) / 50.0, atol=1.01 / 50.0)


def test_constant_image_stays_constant():
    src = np.full((37, 51, 3), 77, np.uint8)
    out = np.empty((3, 224, 224), np.float32)
    resample_into(src, (1.5, 2.5, 40.0, 30.0), True, np.zeros(3, np.float32), np.ones(3, np.float32), out)
    np.testing.assert_allclose(out, 77.0, rtol=1e-5)


@pytest.mark.parametrize("transform", [RandomResizedCrop(224), ResizeCenterCrop(256, 224)])
def test_write_into_equals_transform_then_normalize(tmp_path, transform):
    """Same random draws (box, flip) and the same pixels within one 8-bit level, for files and arrays."""
    path = str(tmp_path / "a.JPEG")
    Image.fromarray(photo(seed=3)).save(path, quality=90)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for sample in (path, photo(seed=4)):
        for seed in range(6):
            ref = np.empty((3, 224, 224), np.float32)
            norm.write(transform(sample, np.random.default_rng(seed)), ref)
            got = np.empty((3, 224, 224), np.float32)
            transform.write_into(sample, np.random.default_rng(seed), norm, got)
            assert np.abs(got - ref).max() <= 1.01 / min(IMAGENET_STD)


def test_write_into_rejects_a_slot_of_the_wrong_size():
    with pytest.raises(DataError, match="224x224"):
        RandomResizedCrop(224).write_into(photo(), np.random.default_rng(0), Normalize((0,), (1,)),
                                          np.empty((3, 200, 200), np.float32))
