"""2-D convolution on NumPy: GEMMs on layouts that need no pad, transpose or reshape copies.

Two layouts, chosen per call from the output's pixel count ``P = Ho * Wo``:

* per-image (``P >= BATCHED_BELOW``): the patch matrix is ``col[n]`` of shape
  ``(K, P)`` with ``K = Cin * kh * kw``, and ``y[n] = W @ col[n]`` lands in
  NCHW directly (one stacked ``matmul``, one GEMM per image). A 1x1, stride-1,
  unpadded convolution uses ``x[n]`` itself as ``col[n]``: a direct GEMM with no
  im2col at all.
* batched (small ``P``, the late stages): one GEMM ``(Cout, K) @ (K, N * P)``
  instead of N skinny ones, whose efficiency collapses at ``P`` of 4-49;
  the output is then moved to NCHW by a parallel copy (cheap at small ``P``).

im2col/col2im are numba kernels (one per layout, each writing its layout's
contiguous order), parallel over (image, channel) or (channel, tap), that test
the padding bounds instead of padding a copy of the input; col2im zero-fills
each output plane in the thread that accumulates into it. The forward patch
matrix is kept for the weight gradient (no second im2col in backward).

Small channel counts (``Cout <= SMALL_COUT``, kernels larger than 1x1: the
CIFAR-style ResNets' 8-32 channels) take a *cache-blocked* variant of either
layout: a GEMM with 8-32 rows does a few FLOPs per byte of the patch matrix,
so the time goes into writing ``col`` (9x the activation) to memory and
reading it back, in forward, weight gradient and col2im alike. The blocked
variant runs im2col, GEMM and col2im over blocks of images whose patch matrix
fits ``CHUNK_BYTES`` (one buffer reused by every block, so it stays in cache)
and does not keep ``col``: backward recomputes each block's im2col, which
costs less than a round trip of the whole matrix through memory. Since the
direct kernels of :mod:`hpcsgd.kernels.conv_direct` took over the 2-32-channel
3x3 convolutions, the blocked variant serves the rest (1-channel stems, shapes
outside ``conv_direct.applies``).
"""

from __future__ import annotations

import os

import chainer
import numpy as np
from chainer import function_node
from numba import prange

from hpcsgd.kernels import conv_direct
from hpcsgd.kernels._numba import kernel

#: Output pixel count below which the batched (one GEMM per layer) layout is used: maps up to
#: 17x17. Measured on a 2-core AVX-512 EPYC: at 16x16 (ResNet-50's first stage at 64 px) one
#: GEMM per layer beat 32 per-image GEMMs by 4% at 1 thread and 9% at 2 (``benchmarks/compute.py``,
#: 32 x 64); at 56x56 and 28x28 per-image GEMMs are as fast and need no layout swap.
BATCHED_BELOW = int(os.environ.get("HPCSGD_CONV_BATCHED_BELOW", "300"))
#: Convolutions (not 1x1) with at most this many output channels take the cache-blocked path
#: (0 switches it off). ResNet-50's convolutions all have 64 or more: unchanged.
SMALL_COUT = int(os.environ.get("HPCSGD_CONV_SMALL_COUT", "32"))
#: Bytes of patch matrix per block of images on the cache-blocked path (a quarter of a 2 MiB L2;
#: 256-512 KiB measured alike, 4 MiB lost most of the gain).
CHUNK_BYTES = int(os.environ.get("HPCSGD_CONV_CHUNK_BYTES", str(1 << 19)))


@kernel
def _im2col(x, col, kh, kw, sy, sx, ph, pw):
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
                # ox range whose input column lies inside [0, w)
                lo = max(0, (pw - j + sx - 1) // sx)
                hi = max(min(wo, (w - 1 + pw - j) // sx + 1), lo)
                base = j - pw
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
def _col2im(col, gx, kh, kw, sy, sx, ph, pw):
    """Adjoint of :func:`_im2col`: ``gx`` (overwritten) accumulates every patch entry."""
    n_img, n_ch, h, w = gx.shape
    ho = col.shape[4]
    wo = col.shape[5]
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        for iy in range(h):
            for ix in range(w):
                gx[n, c, iy, ix] = 0
        for i in range(kh):
            for j in range(kw):
                lo = max(0, (pw - j + sx - 1) // sx)
                hi = max(min(wo, (w - 1 + pw - j) // sx + 1), lo)
                base = j - pw
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
def _im2col_cn(x, col, kh, kw, sy, sx, ph, pw):
    """:func:`_im2col` for the batched layout ``col[c, i, j, n, oy, ox]`` (C-contiguous).

    Parallel over (channel, tap), so each task writes one contiguous block;
    2-3x faster than writing the same block through a transposed view.
    """
    n_img, n_ch, h, w = x.shape
    ho = col.shape[4]
    wo = col.shape[5]
    for cij in prange(n_ch * kh * kw):
        c = cij // (kh * kw)
        i = (cij // kw) % kh
        j = cij % kw
        lo = max(0, (pw - j + sx - 1) // sx)
        hi = max(min(wo, (w - 1 + pw - j) // sx + 1), lo)
        base = j - pw
        for n in range(n_img):
            for oy in range(ho):
                iy = oy * sy + i - ph
                if iy < 0 or iy >= h:
                    for ox in range(wo):
                        col[c, i, j, n, oy, ox] = 0
                    continue
                dst = col[c, i, j, n, oy]
                dst[:lo] = 0
                if sx == 1:
                    dst[lo:hi] = x[n, c, iy, lo + base:hi + base]
                else:
                    for ox in range(lo, hi):
                        dst[ox] = x[n, c, iy, ox * sx + base]
                dst[hi:] = 0


@kernel
def _col2im_cn(col, gx, kh, kw, sy, sx, ph, pw):
    """Adjoint of :func:`_im2col_cn` (``col[c, i, j, n, oy, ox]``, C-contiguous), parallel over channels.

    Each task owns the planes ``gx[:, c]`` and reads its channel's block of
    ``col`` in memory order (taps outer, images inner): 2x faster than one
    task per (image, channel) plane gathering nine scattered tap blocks. Each
    element still sums its taps in (i, j) order, so the result is unchanged.
    """
    n_img, n_ch, h, w = gx.shape
    ho = col.shape[4]
    wo = col.shape[5]
    for c in prange(n_ch):
        for n in range(n_img):
            for iy in range(h):
                for ix in range(w):
                    gx[n, c, iy, ix] = 0
        for i in range(kh):
            for j in range(kw):
                lo = max(0, (pw - j + sx - 1) // sx)
                hi = max(min(wo, (w - 1 + pw - j) // sx + 1), lo)
                base = j - pw
                for n in range(n_img):
                    for oy in range(ho):
                        iy = oy * sy + i - ph
                        if iy < 0 or iy >= h:
                            continue
                        if sx == 1:
                            gx[n, c, iy, lo + base:hi + base] += col[c, i, j, n, oy, lo:hi]
                        else:
                            for ox in range(lo, hi):
                                gx[n, c, iy, ox * sx + base] += col[c, i, j, n, oy, ox]


@kernel
def _swap01(a, out):
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
    _swap01(a, out)
    return out


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


class Conv2D(function_node.FunctionNode):
    """``y = conv2d(x, W) + b`` for NCHW NumPy arrays (no dilation, no groups)."""

    def __init__(self, stride=1, pad=0):
        self.sy, self.sx = _pair(stride)
        self.ph, self.pw = _pair(pad)

    def forward_cpu(self, inputs):
        x, W = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) == 3 else None
        if x.ndim != 4 or W.ndim != 4 or x.shape[1] != W.shape[1]:
            raise ValueError(f"conv2d: input {x.shape} and weight {W.shape} do not match (NCHW, OIHW)")
        n, c, h, w = x.shape
        cout, _, kh, kw = W.shape
        ho = (h + 2 * self.ph - kh) // self.sy + 1
        wo = (w + 2 * self.pw - kw) // self.sx + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"conv2d: kernel {kh}x{kw}, pad {self.ph},{self.pw} does not fit input {h}x{w}")
        p = ho * wo
        k = c * kh * kw
        self.x_shape = x.shape
        self.out_hw = (ho, wo)
        self.kh, self.kw = kh, kw
        self.direct = kh == 1 and kw == 1 and self.sy == 1 and self.sx == 1 and self.ph == 0 and self.pw == 0
        self.batched = p < BATCHED_BELOW
        # 1x1 kernels have no 9x patch matrix to save (blocking measured 15-25% slower on them)
        self.blocked = not self.direct and cout <= SMALL_COUT and kh * kw > 1
        x = np.ascontiguousarray(x)
        W2 = np.ascontiguousarray(W).reshape(cout, k)
        if self.blocked:
            y = np.empty((n, cout, p), dtype=x.dtype)
            col = None
            self._blocked_forward(x, W2, y)
        elif self.batched:
            # col: (K, N*P); y = W2 @ col is (Cout, N, P) and is swapped to NCHW.
            if self.direct:
                col = swap01(x.reshape(n, c, p)).reshape(k, n * p)
            else:
                col = np.empty((k, n * p), dtype=x.dtype)
                _im2col_cn(x, col.reshape(c, kh, kw, n, ho, wo), kh, kw, self.sy, self.sx, self.ph, self.pw)
            y = swap01((W2 @ col).reshape(cout, n, p))
        else:
            if self.direct:
                col = x.reshape(n, k, p)
            else:
                col = np.empty((n, k, p), dtype=x.dtype)
                _im2col(x, col.reshape(n, c, kh, kw, ho, wo), kh, kw, self.sy, self.sx, self.ph, self.pw)
            y = np.matmul(W2, col)
        self.col = col
        if b is not None:
            y += b.reshape(1, cout, 1)
        self.retain_inputs((0, 1) if self.blocked else (1,))
        return (y.reshape(n, cout, ho, wo),)

    # -- cache-blocked path (small Cout) -------------------------------------------------------
    # Per-image layout: block col (m, K, P), y[n] = W2 @ col[n]. Batched layout: block col (K, m*P),
    # one GEMM per block, swapped into y[a:b]. Buffers are reused by every block.
    def _blocks(self, k: int, p: int, itemsize: int):
        """``nb`` and the blocks ``(a, b)`` of images whose patch matrix fits ``CHUNK_BYTES``."""
        n = self.x_shape[0]
        nb = max(1, min(n, CHUNK_BYTES // max(1, k * p * itemsize)))
        return nb, [(a, min(a + nb, n)) for a in range(0, n, nb)]

    def _im2col_block(self, x, buf, k, p):
        """im2col of the images ``x`` into the front of ``buf`` in this call's layout; returns the view."""
        m, c = x.shape[:2]
        ho, wo = self.out_hw
        col = buf[:m * k * p]
        args = (self.kh, self.kw, self.sy, self.sx, self.ph, self.pw)
        if self.batched:
            _im2col_cn(x, col.reshape(c, self.kh, self.kw, m, ho, wo), *args)
            return col.reshape(k, m * p)
        _im2col(x, col.reshape(m, c, self.kh, self.kw, ho, wo), *args)
        return col.reshape(m, k, p)

    def _blocked_forward(self, x, W2, y):
        """``y`` (N, Cout, P) block by block through one cache-sized patch buffer."""
        cout, k = W2.shape
        p = y.shape[2]
        nb, blocks = self._blocks(k, p, x.itemsize)
        buf = np.empty(nb * k * p, dtype=x.dtype)
        tbuf = np.empty(nb * cout * p, dtype=x.dtype) if self.batched else None
        for a, b in blocks:
            col = self._im2col_block(x[a:b], buf, k, p)
            if self.batched:
                t = np.matmul(W2, col, out=tbuf[:cout * (b - a) * p].reshape(cout, (b - a) * p))
                _swap01(t.reshape(cout, b - a, p), y[a:b])
            else:
                np.matmul(W2, col, out=y[a:b])

    def _blocked_backward(self, x, W2, gy, indexes):
        """Weight and input gradients block by block; each block's im2col is recomputed in cache."""
        cout, k = W2.shape
        p = gy.shape[2]
        c = self.x_shape[1]
        ho, wo = self.out_hw
        args = (self.kh, self.kw, self.sy, self.sx, self.ph, self.pw)
        nb, blocks = self._blocks(k, p, gy.itemsize)
        out = {}
        buf = np.empty(nb * k * p, dtype=gy.dtype)
        gbuf = np.empty(nb * k * p, dtype=gy.dtype)
        if 1 in indexes:
            out[1] = gW = np.zeros((cout, k), dtype=gy.dtype)
            part = np.empty((nb, cout, k), dtype=gy.dtype)
        if 0 in indexes:
            out[0] = gx = np.empty(self.x_shape, dtype=gy.dtype)
        gyt_buf = np.empty(nb * cout * p, dtype=gy.dtype) if self.batched else None
        for a, b in blocks:
            m = b - a
            g = gy[a:b]
            if self.batched:  # (Cout, m*P), the GEMM layout of this block
                g = gyt_buf[:cout * m * p].reshape(cout, m, p)
                _swap01(gy[a:b], g)
                g = g.reshape(cout, m * p)
            if 1 in indexes:
                col = self._im2col_block(x[a:b], buf, k, p)
                if self.batched:
                    gW += g @ col.T
                else:
                    np.matmul(g, col.transpose(0, 2, 1), out=part[:m])
                    gW += part[:m].sum(axis=0)
            if 0 in indexes:
                if self.batched:
                    gcol = np.matmul(W2.T, g, out=gbuf[:k * m * p].reshape(k, m * p))
                    _col2im_cn(gcol.reshape(c, self.kh, self.kw, m, ho, wo), gx[a:b], *args)
                else:
                    gcol = np.matmul(W2.T, g, out=gbuf[:k * m * p].reshape(m, k, p))
                    _col2im(gcol.reshape(m, c, self.kh, self.kw, ho, wo), gx[a:b], *args)
        return out

    def backward(self, indexes, grad_outputs):
        retained = [v.array for v in self.get_retained_inputs()]
        W = retained[-1]
        cout, c, kh, kw = W.shape
        n, _, h, w = self.x_shape
        ho, wo = self.out_hw
        p, k = ho * wo, c * kh * kw
        W2 = np.ascontiguousarray(W).reshape(cout, k)
        gy = np.ascontiguousarray(grad_outputs[0].array).reshape(n, cout, p)
        col = self.col
        out = {}
        if self.blocked:
            out = self._blocked_backward(np.ascontiguousarray(retained[0]), W2, gy, indexes)
            if 1 in out:
                out[1] = out[1].reshape(W.shape)
        elif self.batched:
            gyt = swap01(gy).reshape(cout, n * p)
            if 1 in indexes:
                out[1] = (gyt @ col.T).reshape(W.shape)
            if 0 in indexes:
                gcol = W2.T @ gyt
                if self.direct:
                    gx = swap01(gcol.reshape(c, n, p))
                else:
                    gx = np.empty(self.x_shape, dtype=gy.dtype)
                    gcol6 = gcol.reshape(c, kh, kw, n, ho, wo)
                    _col2im_cn(gcol6, gx, kh, kw, self.sy, self.sx, self.ph, self.pw)
                out[0] = gx.reshape(self.x_shape)
        else:
            if 1 in indexes:
                gW = gy[0] @ col[0].T
                tmp = np.empty_like(gW)
                for i in range(1, n):
                    np.matmul(gy[i], col[i].T, out=tmp)
                    gW += tmp
                out[1] = gW.reshape(W.shape)
            if 0 in indexes:
                gcol = np.matmul(W2.T, gy)
                if self.direct:
                    gx = gcol
                else:
                    gx = np.empty(self.x_shape, dtype=gy.dtype)
                    view = gcol.reshape(n, c, kh, kw, ho, wo)
                    _col2im(view, gx, kh, kw, self.sy, self.sx, self.ph, self.pw)
                out[0] = gx.reshape(self.x_shape)
        if 2 in indexes:
            out[2] = gy.sum(axis=(0, 2))
        return tuple(chainer.Variable(out[i]) for i in indexes)


def conv2d(x, W, b=None, stride=1, pad=0):
    """ops contract: NCHW convolution of NumPy inputs, a ``chainer.Variable`` out.

    Convolutions larger than 1x1 at stride 1 or 2 with 2-32 channels take the
    direct kernel of :mod:`hpcsgd.kernels.conv_direct` (no patch matrix; see its
    ``applies``); the rest this module's GEMMs.
    """
    inputs = (x, W) if b is None else (x, W, b)
    stride, pad = _pair(stride), _pair(pad)
    if conv_direct.applies(x.shape, W.shape, stride, pad):
        return conv_direct.DirectConv2D(stride, pad).apply(inputs)[0]
    return Conv2D(stride, pad).apply(inputs)[0]
