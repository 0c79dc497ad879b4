"""Max pooling (the ResNet stem's 3x3/2, pad 1) as a numba kernel, parallel over (image, channel).

Chainer's CPU max pooling pads a copy with -inf, builds a 9x im2col array and
takes its argmax; this kernel scans each window in place and keeps the winning
input offset (int32) for the backward scatter. Semantics are Chainer's with
``cover_all=False``: padding never wins, ties go to the first element in
row-major window order, NaN inputs propagate.
"""

from __future__ import annotations

import chainer
import numpy as np
from chainer import function_node
from numba import prange

from hpcsgd.kernels._numba import kernel
from hpcsgd.kernels.patches import columns


@kernel
def _max_pool_forward(x, kh, kw, sy, sx, ph, pw, y, arg):
    """Tap by tap over whole output rows: each tap updates the row's running maxima.

    A tap replaces an output's maximum when it is the window's first valid tap, larger, or
    NaN where the maximum is not (so NaN propagates); ties keep the earlier tap (row-major
    window order). With the taps outer and the output columns inner, the columns are
    independent and vectorise; one window at a time was a dependent chain of compares
    (15 ms for the stem of ResNet-50 at 64 px, batch 32).
    """
    n_img, n_ch, h, w = x.shape
    ho = y.shape[2]
    wo = y.shape[3]
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        for oy in range(ho):
            best = y[n, c, oy]
            where = arg[n, c, oy]
            best[:] = -np.inf
            where[:] = -1
            for i in range(kh):
                iy = oy * sy + i - ph
                if iy < 0 or iy >= h:
                    continue
                row = x[n, c, iy]
                for j in range(kw):
                    lo, hi, base = columns(j, pw, sx, w, wo)
                    first = np.int32(iy * w + base)
                    for ox in range(lo, hi):
                        v = row[ox * sx + base]
                        b = best[ox]
                        wh = where[ox]
                        take = (wh < 0) | (v > b) | ((v != v) & (b == b))
                        best[ox] = v if take else b
                        where[ox] = first + np.int32(ox * sx) if take else wh


@kernel
def _max_pool_backward(gy, arg, gx):
    n_img, n_ch, h, w = gx.shape
    ho = gy.shape[2]
    wo = gy.shape[3]
    for nc in prange(n_img * n_ch):
        n = nc // n_ch
        c = nc % n_ch
        for iy in range(h):
            for ix in range(w):
                gx[n, c, iy, ix] = 0
        for oy in range(ho):
            for ox in range(wo):
                k = arg[n, c, oy, ox]
                gx[n, c, k // w, k % w] += gy[n, c, oy, ox]


class MaxPool2D(function_node.FunctionNode):
    """``max_pooling_2d(x, ksize, stride, pad, cover_all=False)`` for NCHW NumPy arrays."""

    def __init__(self, ksize, stride, pad):
        self.kh, self.kw = (ksize, ksize) if np.isscalar(ksize) else ksize
        self.sy, self.sx = (stride, stride) if np.isscalar(stride) else stride
        self.ph, self.pw = (pad, pad) if np.isscalar(pad) else pad

    def forward_cpu(self, inputs):
        (x,) = inputs
        n, c, h, w = x.shape
        ho = (h + 2 * self.ph - self.kh) // self.sy + 1
        wo = (w + 2 * self.pw - self.kw) // self.sx + 1
        if ho <= 0 or wo <= 0 or self.ph >= self.kh or self.pw >= self.kw:
            raise ValueError(f"max_pool2d: window {self.kh}x{self.kw} pad {self.ph},{self.pw} on {h}x{w}")
        y = np.empty((n, c, ho, wo), dtype=x.dtype)
        self.arg = np.empty((n, c, ho, wo), dtype=np.int32)
        _max_pool_forward(np.ascontiguousarray(x), self.kh, self.kw, self.sy, self.sx, self.ph, self.pw,
                          y, self.arg)
        self.x_shape = x.shape
        return (y,)

    def backward(self, indexes, grad_outputs):
        gx = np.empty(self.x_shape, dtype=grad_outputs[0].dtype)
        _max_pool_backward(np.ascontiguousarray(grad_outputs[0].array), self.arg, gx)
        return (chainer.Variable(gx),)


def max_pool2d(x, ksize, stride=None, pad=0):
    """NCHW max pooling of NumPy inputs (``cover_all=False``); ``stride`` defaults to ``ksize``."""
    return MaxPool2D(ksize, ksize if stride is None else stride, pad).apply((x,))[0]
