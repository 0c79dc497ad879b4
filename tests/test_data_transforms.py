"""Transforms against independent references: crop geometry, resize content, pad-crop, normalization."""

import math

import numpy as np
import pytest
from data_fixtures import smooth_rgb
from PIL import Image

from hpcsgd.data import Normalize, PadRandomCrop, RandomResizedCrop, ResizeCenterCrop
from hpcsgd.data.jpeg import draft_scale_for, open_for_crop


def ramp(w, h):
    """uint8 (h, w, 3): channel 0 = x, channel 1 = y, channel 2 = 77."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.full_like(xx, 77)], axis=2).astype(np.uint8)


def test_random_resized_crop_box_ranges():
    t = RandomResizedCrop(size=32, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for _ in range(300):
        x0, y0, x1, y1 = t.box(200, 150, rng)
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 150
        area = (x1 - x0) * (y1 - y0) / (200 * 150)
        assert 0.2 * 0.93 <= area <= 0.6 * 1.07, area
        assert 0.5 * 0.93 <= (x1 - x0) / (y1 - y0) <= 2.0 * 1.07
    # impossible aspect ratios: centred fallback with the ratio clamped
    tall = RandomResizedCrop(size=8, scale=(0.99, 1.0), ratio=(3.0, 4.0))
    assert tall.box(100, 100, rng) == (0, 33, 100, 66)  # h = round(100 / 3), centred


def test_random_resized_crop_content_matches_resampled_ramp():
    img = ramp(200, 150)
    t = RandomResizedCrop(size=40, flip=False)
    for seed in range(5):
        x0, y0, x1, y1 = t.box(200, 150, np.random.default_rng(seed))
        out = t(img, np.random.default_rng(seed))
        assert out.shape == (40, 40, 3) and out.dtype == np.uint8
        j = np.arange(40)
        want_x = x0 + (j + 0.5) * (x1 - x0) / 40 - 0.5  # pixel-centre mapping of a linear ramp
        want_y = y0 + (j + 0.5) * (y1 - y0) / 40 - 0.5
        inner = slice(2, 38)  # edge taps clamp at the box border
        assert np.abs(out[20, inner, 0] - want_x[inner]).max() <= 1.01
        assert np.abs(out[inner, 20, 1] - want_y[inner]).max() <= 1.01
        assert (out[:, :, 2] == 77).all()


def test_flip_is_a_mirror_with_probability_half():
    img = smooth_rgb(64, 48, 1)
    flips = 0
    for seed in range(20):
        a = RandomResizedCrop(size=16, flip=False)(img, np.random.default_rng(seed))
        b = RandomResizedCrop(size=16, flip=True)(img, np.random.default_rng(seed))
        if np.array_equal(b, a[:, ::-1]) and not np.array_equal(a, a[:, ::-1]):
            flips += 1
        else:
            assert np.array_equal(a, b)
    assert 4 <= flips <= 16


def test_eval_center_crop_exact_when_no_resize():
    img = smooth_rgb(320, 256, 2)  # shorter side already 256
    out = ResizeCenterCrop(256, 224)(img)
    assert np.array_equal(out, img[16:240, 48:272])


def test_eval_resize_then_center_crop_on_ramp():
    img = ramp(250, 200)  # short side 200 -> 256: scale 1.28, resized 320x256, crop at (48, 16)
    out = ResizeCenterCrop(256, 224)(img).astype(float)
    s = 200 / 256
    j = np.arange(224)
    want_x = (48 + j + 0.5) * s - 0.5
    want_y = (16 + j + 0.5) * s - 0.5
    assert np.abs(out[100, 2:-2, 0] - want_x[2:-2]).max() <= 1.01
    assert np.abs(out[2:-2, 100, 1] - want_y[2:-2]).max() <= 1.01


def test_pad_random_crop_matches_numpy_pad():
    img = np.random.default_rng(3).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    t = PadRandomCrop(pad=4)
    for seed in range(12):
        out = t(img, np.random.default_rng(seed))
        ref_rng = np.random.default_rng(seed)
        dy, dx = ref_rng.integers(0, 9, size=2)
        ref = np.pad(img, ((4, 4), (4, 4), (0, 0)))[dy:dy + 28, dx:dx + 28]
        if ref_rng.random() < 0.5:
            ref = ref[:, ::-1]
        assert np.array_equal(out, ref)


def test_normalize_against_float64():
    img = np.random.default_rng(4).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    norm = Normalize((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    out = np.empty((3, 5, 6), np.float32)
    norm.write(img, out)
    ref = (img.transpose(2, 0, 1).astype(np.float64) - np.array(norm.mean)[:, None, None]) \
        / np.array(norm.std)[:, None, None]
    assert np.abs(out - ref).max() < 1e-5
    batch = np.ascontiguousarray(img.transpose(2, 0, 1)[None])
    assert np.abs(norm.apply(batch)[0] - ref).max() < 1e-5
    raw = np.empty((3, 5, 6), np.uint8)
    norm.write(img, raw)
    assert np.array_equal(raw, img.transpose(2, 0, 1))


def test_draft_request_keeps_crop_at_least_output_size():
    # crop 500x375 -> 64x64 allows 1/4 scale (1/8 would give 62x46 < 64)
    req = draft_scale_for((500, 375), 500, 375, 64, 64)
    scale = min(500 // req[0], 375 // req[1])
    s = max(a for a in (1, 2, 4, 8) if a <= scale)
    assert s == 4 and 500 / s >= 64 and math.ceil(375 / s) >= 64
    assert draft_scale_for((500, 375), 100, 100, 224, 224) == (1120, 840)  # no reduction possible


def test_draft_decode_close_to_full_decode(tmp_path):
    p = str(tmp_path / "a.JPEG")
    Image.fromarray(smooth_rgb(500, 375, 5)).save(p, quality=90)
    rgb, box = open_for_crop(p, (0, 0, 500, 375), (64, 64), draft=True)
    assert rgb.size == (125, 94) and box == (0.0, 0.0, 125.0, pytest.approx(375 / 4))
    t_fast, t_full = RandomResizedCrop(size=64), RandomResizedCrop(size=64, draft=False)
    diffs = []
    for seed in range(6):
        a = t_fast(p, np.random.default_rng(seed)).astype(float)
        b = t_full(p, np.random.default_rng(seed)).astype(float)
        diffs.append(np.abs(a - b).mean())
    assert max(diffs) < 4.0, diffs  # same crop, DCT-domain downscale vs bilinear: a few levels
    e_fast = ResizeCenterCrop(80, 64)(p)
    e_full = ResizeCenterCrop(80, 64, draft=False)(p)
    assert np.abs(e_fast.astype(float) - e_full).mean() < 4.0
