"""Patch matrices of a convolution (im2col and its adjoint col2im) and the NCP <-> CNP swap.

Why a module of their own: :mod:`hpcsgd.kernels.conv` builds its GEMMs on them in
two layouts, per image (``col[n, c, i, j, oy, ox]``) and batched
(``col[c, i, j, n, oy, ox]``, the input read in NCHW or channel-major memory,
:mod:`hpcsgd.kernels.layout`). Each kernel tests the padding bounds instead of
padding a copy of the input, and writes its layout's contiguous order; col2im
zero-fills each output plane in the thread that accumulates into it. Stride-1
rows are copied or added as whole slices, which vectorise.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hpcsgd.kernels._numba import kernel
from hpcsgd.kernels.layout import row_index


@njit(inline="always", cache=True)
def columns(j, pw, sx, w, wo):
    """``(lo, hi, base)``: the output columns ``[lo, hi)`` whose tap ``j`` reads inside ``[0, w)``,
    and the input column of output column ``ox`` is ``ox * sx + base``."""
    lo = max(0, (pw - j + sx - 1) // sx)
    return lo, max(min(wo, (w - 1 + pw - j) // sx + 1), lo), j - pw


@kernel
def im2col(x, col, kh, kw, sy, sx, ph, pw):
    """``col[n, c, i, j, oy, ox] = x[n, c, oy*sy + i - ph, ox*sx + j - pw]`` or 0 outside.

    Stride 1 copies each row as one contiguous slice (vectorised: 2.6-4x faster
    than the element loop, which a runtime stride keeps scalar).
    """
    n_img, n_ch, h, w = x.shape
    ho = col.shape[4]
    wo = col.shape[5]
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        for i in range(kh):
            for j in range(kw):
                lo, hi, base = columns(j, pw, sx, w, wo)
                for oy in range(ho):
                    iy = oy * sy + i - ph
                    dst = col[n, c, i, j, oy]
                    if iy < 0 or iy >= h:
                        dst[:] = 0
                        continue
                    dst[:lo] = 0
                    src = x[n, c, iy]
                    if sx == 1:
                        dst[lo:hi] = src[lo + base:hi + base]
                    else:
                        for ox in range(lo, hi):
                            dst[ox] = src[ox * sx + base]
                    dst[hi:] = 0


@kernel
def col2im(col, gx, kh, kw, sy, sx, ph, pw):
    """Adjoint of :func:`im2col`: ``gx`` (overwritten) accumulates every patch entry."""
    n_img, n_ch, h, w = gx.shape
    ho = col.shape[4]
    wo = col.shape[5]
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        gx[n, c] = 0
        for i in range(kh):
            for j in range(kw):
                lo, hi, base = columns(j, pw, sx, w, wo)
                for oy in range(ho):
                    iy = oy * sy + i - ph
                    if iy < 0 or iy >= h:
                        continue
                    if sx == 1:  # one vectorised slice add (up to 1.4x faster on wide rows)
                        gx[n, c, iy, lo + base:hi + base] += col[n, c, i, j, oy, lo:hi]
                    else:
                        for ox in range(lo, hi):
                            gx[n, c, iy, ox * sx + base] += col[n, c, i, j, oy, ox]


@kernel
def im2col_cn(x, n_img, cm, col, kh, kw, sy, sx, ph, pw):
    """:func:`im2col` for the batched layout ``col[c, i, j, n, oy, ox]`` (C-contiguous).

    ``x`` is the input's rows, ``(N * C, H, W)`` in NCHW or channel-major order (``cm``,
    :func:`hpcsgd.kernels.layout.rows`). Parallel over (channel, tap), so each task writes
    one contiguous block; 2-3x faster than writing the same block through a transposed view.
    """
    h, w = x.shape[1], x.shape[2]
    n_ch = x.shape[0] // n_img
    ho = col.shape[4]
    wo = col.shape[5]
    for cij in prange(n_ch * kh * kw):
        c = cij // (kh * kw)
        i = (cij // kw) % kh
        j = cij % kw
        lo, hi, base = columns(j, pw, sx, w, wo)
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            for oy in range(ho):
                iy = oy * sy + i - ph
                if iy < 0 or iy >= h:
                    for ox in range(wo):
                        col[c, i, j, n, oy, ox] = 0
                    continue
                dst = col[c, i, j, n, oy]
                dst[:lo] = 0
                if sx == 1:
                    dst[lo:hi] = x[r, iy, lo + base:hi + base]
                else:
                    for ox in range(lo, hi):
                        dst[ox] = x[r, iy, ox * sx + base]
                dst[hi:] = 0


@kernel
def col2im_cn(col, gx, n_img, cm, kh, kw, sy, sx, ph, pw):
    """Adjoint of :func:`im2col_cn` (``col[c, i, j, n, oy, ox]``, C-contiguous), parallel over channels.

    ``gx`` is the output's rows (``(N * C, H, W)``, order ``cm``). Each task owns its channel's
    planes and reads its channel's block of ``col`` in memory order (taps outer, images
    inner): 2x faster than one task per (image, channel) plane gathering nine scattered tap
    blocks. Each element still sums its taps in (i, j) order, so the result is unchanged.
    """
    h, w = gx.shape[1], gx.shape[2]
    n_ch = gx.shape[0] // n_img
    ho = col.shape[4]
    wo = col.shape[5]
    for c in prange(n_ch):
        for n in range(n_img):
            gx[row_index(n, c, n_img, n_ch, cm)] = 0
        for i in range(kh):
            for j in range(kw):
                lo, hi, base = columns(j, pw, sx, w, wo)
                for n in range(n_img):
                    r = row_index(n, c, n_img, n_ch, cm)
                    for oy in range(ho):
                        iy = oy * sy + i - ph
                        if iy < 0 or iy >= h:
                            continue
                        if sx == 1:
                            gx[r, iy, lo + base:hi + base] += col[c, i, j, n, oy, lo:hi]
                        else:
                            for ox in range(lo, hi):
                                gx[r, iy, ox * sx + base] += col[c, i, j, n, oy, ox]


@kernel
def swap01_into(a, out):
    """``out[j, i, :] = a[i, j, :]`` for 3-D arrays (NCP <-> CNP), parallel over rows."""
    d0, d1, d2 = a.shape
    for ij in prange(d0 * d1):
        i = ij // d1
        j = ij % d1
        for k in range(d2):
            out[j, i, k] = a[i, j, k]


def swap01(a: np.ndarray) -> np.ndarray:
    """A contiguous copy of ``a.transpose(1, 0, 2)``."""
    a = np.ascontiguousarray(a)
    out = np.empty((a.shape[1], a.shape[0], a.shape[2]), dtype=a.dtype)
    swap01_into(a, out)
    return out
