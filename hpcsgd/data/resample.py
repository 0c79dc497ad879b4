"""Crop + antialiased bilinear resize + flip + normalize, fused into one pass into the batch slot.

What the training and evaluation transforms do per image after decoding is a
resize of a crop box to the output size, an optional horizontal flip and
``(x - mean) / std`` into a float32 CHW slot. Done as separate steps (Pillow
``resize``, ``np.asarray``, a flipped copy, a transposing normalize) that is
~1.9 ms of CPU per 224 px image on the development machine, about 40% of the
decode + augment cost; fused here it is one numba kernel of two separable
passes that reads the decoded uint8 pixels once and writes the slot once
(measured in ``benchmarks/loader.py``).

The filter is Pillow's ``BILINEAR`` resampling, antialiased like Pillow's:
a triangle of half-width ``max(scale, 1)`` input pixels around each output
pixel's centre, weights normalized to sum 1, the box given in (fractional)
input pixels. Differences from Pillow: no rounding to uint8 between the two
passes and at the end (Pillow's fixed-point arithmetic does both), so results
agree within about one 8-bit level (tested). The flip reverses the output
columns' filter taps, so it costs nothing.
"""

from __future__ import annotations

import math

import numpy as np

from hpcsgd.kernels._numba import kernel


@kernel(parallel=False)
def _resample_into(src, x_first, x_w, y_first, y_w, mean, inv_std, out, to_uint8):  # pragma: no cover
    """Separable resample of ``src`` (H, W, C) uint8 into ``out`` (C, oh, ow) float32 or uint8.

    Per output row: the vertical pass first (a weighted sum of whole input
    rows, contiguous, so it vectorizes), over the columns the filters use;
    then the horizontal pass gathers that row into the slot. Inner loops
    index slices with range counters only (no computed indices, which numba
    guards against negative values and which then stop vectorization).
    """
    n_ch = src.shape[2]
    out_h, out_w = out.shape[1], out.shape[2]
    taps_x, taps_y = x_w.shape[1], y_w.shape[1]
    c0, c1 = x_first[0], x_first[0]
    for q in range(out_w):
        c0 = min(c0, x_first[q])
        c1 = max(c1, x_first[q] + taps_x)
    span = (c1 - c0) * n_ch
    lines = src.reshape(src.shape[0], -1)
    row = np.empty(span, np.float32)
    for o in range(out_h):
        row[:] = 0.0
        for k in range(taps_y):
            wk = y_w[o, k]
            seg = lines[y_first[o] + k, c0 * n_ch:c0 * n_ch + span]
            for i in range(span):
                row[i] += wk * np.float32(seg[i])
        if n_ch == 3 and not to_uint8:  # the common case: RGB into a float32 slot, channels unrolled
            o_r, o_g, o_b = out[0, o], out[1, o], out[2, o]
            for q in range(out_w):
                start = np.uint64((x_first[q] - c0) * 3)  # unsigned: no negative-index guard
                a_r, a_g, a_b = np.float32(0.0), np.float32(0.0), np.float32(0.0)
                for k in range(taps_x):
                    w = x_w[q, k]
                    j = start + np.uint64(3 * k)
                    a_r += w * row[j]
                    a_g += w * row[j + np.uint64(1)]
                    a_b += w * row[j + np.uint64(2)]
                o_r[q] = (a_r - mean[0]) * inv_std[0]
                o_g[q] = (a_g - mean[1]) * inv_std[1]
                o_b[q] = (a_b - mean[2]) * inv_std[2]
            continue
        for q in range(out_w):
            start = np.uint64((x_first[q] - c0) * n_ch)
            for c in range(n_ch):
                acc = np.float32(0.0)
                for k in range(taps_x):
                    acc += x_w[q, k] * row[start + np.uint64(k * n_ch + c)]
                if to_uint8:
                    out[c, o, q] = min(max(acc + np.float32(0.5), np.float32(0.0)), np.float32(255.0))
                else:
                    out[c, o, q] = (acc - mean[c]) * inv_std[c]


@kernel(parallel=False)
def _taps(in_size, out_size, lo, hi, flip):  # pragma: no cover - numba
    """Separable bilinear taps mapping input span ``[lo, hi)`` onto ``out_size`` pixels.

    Returns ``(first, weights)``: ``first[o]`` the first input pixel of output
    ``o`` (int32), ``weights[o, k]`` the weight of input ``first[o] + k`` (float32,
    rows sum to 1, zero-padded to the widest filter; a filter that would run past
    the image edge starts earlier with its weights shifted right, so every tap is
    inside the image). ``flip`` reverses the outputs. tests/test_data_resample.py
    checks it against a NumPy reference.
    """
    scale = (hi - lo) / out_size
    support = max(scale, 1.0)
    taps = 1
    for o in range(out_size):
        centre = lo + (o + 0.5) * scale
        first = max(int(math.floor(centre - support + 0.5)), 0)
        last = min(int(math.floor(centre + support + 0.5)), in_size)
        taps = max(taps, last - first)
    first_out = np.empty(out_size, np.int32)
    w_out = np.zeros((out_size, taps), np.float32)
    for o in range(out_size):
        centre = lo + (o + 0.5) * scale
        first = max(int(math.floor(centre - support + 0.5)), 0)
        last = min(int(math.floor(centre + support + 0.5)), in_size)
        shift = max(first + taps - in_size, 0)
        dst = out_size - 1 - o if flip else o
        total = 0.0
        for x in range(first, last):
            total += max(1.0 - abs((x + 0.5 - centre) / support), 0.0)
        for x in range(first, last):
            w = max(1.0 - abs((x + 0.5 - centre) / support), 0.0)
            w_out[dst, x - first + shift] = w / total if total > 0 else 0.0
        first_out[dst] = first - shift
    return first_out, w_out


def resample_into(src: np.ndarray, box: tuple[float, float, float, float], flip: bool,
                  mean: np.ndarray, inv_std: np.ndarray, out: np.ndarray) -> None:
    """Resize ``src[box]`` to ``out``'s size, flip if asked, normalize, write ``out`` (C, H, W).

    Args:
        src: decoded image, uint8 (H, W, C), C-contiguous.
        box: ``(x0, y0, x1, y1)`` in (fractional) pixels of ``src``.
        flip: mirror horizontally.
        mean, inv_std: float32 (C,) per-channel mean and 1/std, in 0..255 units (ignored for uint8 ``out``).
        out: float32 slot (normalized values) or uint8 slot (rounded pixels), shape (C, out_h, out_w).
    """
    height, width = src.shape[:2]
    x_first, x_w = _taps(width, out.shape[2], float(box[0]), float(box[2]), bool(flip))
    y_first, y_w = _taps(height, out.shape[1], float(box[1]), float(box[3]), False)
    mean = np.ascontiguousarray(mean, np.float32)
    inv_std = np.ascontiguousarray(inv_std, np.float32)
    src = np.ascontiguousarray(src)
    _resample_into(src, x_first, x_w, y_first, y_w, mean, inv_std, out, out.dtype == np.uint8)
