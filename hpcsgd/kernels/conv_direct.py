"""Direct (im2col-free) stride-1 convolution for small channel counts, vectorised across images.

Why: with 8-16 channels a convolution's GEMM has 8-16 rows and does a few FLOPs per
byte of its patch matrix, so the im2col path spends its time writing the 9x patch
matrix and reading it back (forward, weight gradient and col2im alike). This
module never builds one. Each task takes a block of ``NB`` images and copies it to
an image-innermost layout ``xb[c, y, x, n]`` (one pass over the activation; the
block stays in cache). In that layout a tap ``(i, j)`` of output row ``oy`` is one
contiguous multiply-add of ``Wo * NB`` floats::

    yb[co, oy, lo:hi, :] += W[co, ci, i, j] * xb[ci, oy + i - ph, lo + j - pw : hi + j - pw, :]

(a long SAXPY that vectorises whatever the map width: no 28- or 14-float rows to
split into SIMD lanes, no padding copy: the row range ``[lo, hi)`` skips the taps
that fall into the zero padding). The input gradient of a stride-1 convolution is
the same operation on ``gy`` with the flipped, transposed kernel and pad
``k - 1 - p``; the weight gradient is a dot product of the same contiguous rows
(two loads per multiply-add, no stores). Tasks run in parallel over image blocks;
each keeps its own weight-gradient partial sum, summed at the end.

Only stride 1 is implemented: at stride 2 the tap rows are no longer contiguous and
the im2col path measured 2-4x faster. :func:`applies` says which calls
:func:`hpcsgd.kernels.conv.conv2d` routes here (see ``docs/kernels.md``, measured per
layer with ``benchmarks/small_step.py --layers``).
"""

from __future__ import annotations

import os

import chainer
import numpy as np
from chainer import function_node
from numba import prange

from hpcsgd.kernels._numba import kernel

#: Images per block: the vector length of the inner loops is ``Wo * NB`` floats (32 measured
#: 10-30% faster than 16 on 7-14 px maps, equal on 28 px).
NB = 32
#: Largest channel count (in and out) routed to the direct path; 0 switches it off.
DIRECT_MAX_CH = int(os.environ.get("HPCSGD_CONV_DIRECT_MAX_CH", "16"))
#: Smallest output width routed to the direct path (below it the rows are too short to pay).
DIRECT_MIN_WIDTH = int(os.environ.get("HPCSGD_CONV_DIRECT_MIN_WIDTH", "14"))


def applies(x_shape, w_shape, stride, pad) -> bool:
    """True when :func:`hpcsgd.kernels.conv.conv2d` should take this module for these shapes.

    Stride 1, a kernel larger than 1x1 that fits the padded input, at most
    ``DIRECT_MAX_CH`` channels in and out, an output at least ``DIRECT_MIN_WIDTH`` wide.
    """
    if DIRECT_MAX_CH <= 0 or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    (sy, sx), (ph, pw) = stride, pad
    cout, cin, kh, kw = w_shape
    h, w = x_shape[2], x_shape[3]
    wo = w + 2 * pw - kw + 1
    return (sy == 1 and sx == 1 and kh * kw > 1 and x_shape[1] == cin and max(cin, cout) <= DIRECT_MAX_CH
            and 0 <= ph < kh and 0 <= pw < kw and h + 2 * ph >= kh and wo >= max(1, DIRECT_MIN_WIDTH))


@kernel(parallel=False)
def _to_block(x, n0, m, xb):
    """``xb[c, y, x, k] = x[n0 + k, c, y, x]`` for ``k < m``, zero for ``m <= k < NB``."""
    n_ch, h, w = x.shape[1], x.shape[2], x.shape[3]
    nb = xb.shape[3]
    for c in range(n_ch):
        for iy in range(h):
            for ix in range(w):
                dst = xb[c, iy, ix]
                for k in range(m):
                    dst[k] = x[n0 + k, c, iy, ix]
                for k in range(m, nb):
                    dst[k] = 0


@kernel(parallel=False)
def _from_block(yb, y, n0, m):
    """``y[n0 + k] = yb[..., k]`` for ``k < m`` (inverse of :func:`_to_block`)."""
    n_ch, h, w = y.shape[1], y.shape[2], y.shape[3]
    for k in range(m):
        for c in range(n_ch):
            for iy in range(h):
                for ix in range(w):
                    y[n0 + k, c, iy, ix] = yb[c, iy, ix, k]


@kernel(parallel=False)
def _conv_block(xb, W, yb, ph, pw):
    """Stride-1 ``yb = conv(xb, W)`` in the block layout (``yb`` overwritten).

    Output row outer, then input row, then output channel: the ``Cout`` output
    rows of one ``oy`` and the input row in use stay in L1 (plane-at-a-time
    orders streamed the block from L2 once per channel pair). Slices start every
    inner loop at index 0 so numba emits no negative-index wrap-around test,
    which would keep the loop scalar (measured 7x slower).
    """
    n_ch, h, w, nb = xb.shape
    cout, _, kh, kw = W.shape
    ho, wo = yb.shape[1], yb.shape[2]
    for oy in range(ho):
        for co in range(cout):
            yb[co, oy] = 0
        for ci in range(n_ch):
            for i in range(kh):
                iy = oy + i - ph
                if iy < 0 or iy >= h:
                    continue
                xr = xb[ci, iy].reshape(w * nb)
                for co in range(cout):
                    yr = yb[co, oy].reshape(wo * nb)
                    for j in range(kw):
                        lo = max(0, pw - j)
                        hi = min(wo, w + pw - j)
                        if hi <= lo:
                            continue
                        wv = W[co, ci, i, j]
                        ys = yr[lo * nb:hi * nb]
                        xs = xr[(lo + j - pw) * nb:]
                        for q in range(ys.shape[0]):
                            ys[q] += wv * xs[q]


@kernel(parallel=False)
def _weight_grad_block(xb, gyb, gW, ph, pw):
    """``gW[co, ci, i, j] += sum(gyb[co, oy, ox, :] * xb[ci, oy + i - ph, ox + j - pw, :])``.

    Same loop order as :func:`_conv_block` (rows in L1, ``gW`` small enough for L1).
    """
    n_ch, h, w, nb = xb.shape
    cout, _, kh, kw = gW.shape
    ho, wo = gyb.shape[1], gyb.shape[2]
    for oy in range(ho):
        for ci in range(n_ch):
            for i in range(kh):
                iy = oy + i - ph
                if iy < 0 or iy >= h:
                    continue
                xr = xb[ci, iy].reshape(w * nb)
                for co in range(cout):
                    gr = gyb[co, oy].reshape(wo * nb)
                    for j in range(kw):
                        lo = max(0, pw - j)
                        hi = min(wo, w + pw - j)
                        if hi <= lo:
                            continue
                        gs = gr[lo * nb:hi * nb]
                        xs = xr[(lo + j - pw) * nb:]
                        acc = np.float32(0)
                        for q in range(gs.shape[0]):
                            acc += gs[q] * xs[q]
                        gW[co, ci, i, j] += acc


@kernel
def _forward(x, W, y, ph, pw):
    """``y = conv(x, W)``, stride 1, NCHW; parallel over blocks of ``NB`` images."""
    n, c, h, w = x.shape
    cout, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    for b in prange((n + NB - 1) // NB):
        n0 = b * NB
        m = min(NB, n - n0)
        xb = np.empty((c, h, w, NB), dtype=x.dtype)
        yb = np.empty((cout, ho, wo, NB), dtype=x.dtype)
        _to_block(x, n0, m, xb)
        _conv_block(xb, W, yb, ph, pw)
        _from_block(yb, y, n0, m)


@kernel
def _backward(x, gy, Wflip, gx, gW_parts, ph, pw, need_gx, need_gW):
    """Input gradient ``gx`` (if ``need_gx``) and per-block weight gradients ``gW_parts[b]``.

    ``Wflip[ci, co, i, j] = W[co, ci, kh-1-i, kw-1-j]``: the input gradient of a
    stride-1 convolution is the convolution of ``gy`` with it at pad ``k-1-p``.
    """
    n, c, h, w = x.shape
    cout, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    kh, kw = Wflip.shape[2], Wflip.shape[3]
    for b in prange((n + NB - 1) // NB):
        n0 = b * NB
        m = min(NB, n - n0)
        gyb = np.empty((cout, ho, wo, NB), dtype=gy.dtype)
        _to_block(gy, n0, m, gyb)
        if need_gW:
            xb = np.empty((c, h, w, NB), dtype=x.dtype)
            _to_block(x, n0, m, xb)
            gW_parts[b, :] = 0
            _weight_grad_block(xb, gyb, gW_parts[b], ph, pw)
        if need_gx:
            gxb = np.empty((c, h, w, NB), dtype=gy.dtype)
            _conv_block(gyb, Wflip, gxb, kh - 1 - ph, kw - 1 - pw)
            _from_block(gxb, gx, n0, m)


class DirectConv2D(function_node.FunctionNode):
    """``y = conv2d(x, W) + b``, stride 1, NCHW NumPy arrays, through the block layout above."""

    def __init__(self, pad):
        self.ph, self.pw = pad

    def forward_cpu(self, inputs):
        x, W = np.ascontiguousarray(inputs[0]), np.ascontiguousarray(inputs[1])
        n, _, h, w = x.shape
        cout, _, kh, kw = W.shape
        y = np.empty((n, cout, h + 2 * self.ph - kh + 1, w + 2 * self.pw - kw + 1), dtype=x.dtype)
        _forward(x, W, y, self.ph, self.pw)
        if len(inputs) == 3:
            y += inputs[2].reshape(1, cout, 1, 1)
        self.retain_inputs((0, 1))
        return (y,)

    def backward(self, indexes, grad_outputs):
        x, W = (np.ascontiguousarray(v.array) for v in self.get_retained_inputs())
        gy = np.ascontiguousarray(grad_outputs[0].array)
        need_gx, need_gW = 0 in indexes, 1 in indexes
        gx = np.empty_like(x) if need_gx else np.empty((1, 1, 1, 1), dtype=x.dtype)
        n_blocks = (x.shape[0] + NB - 1) // NB
        parts = np.empty((n_blocks if need_gW else 1,) + W.shape, dtype=x.dtype)
        Wflip = np.ascontiguousarray(W.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        _backward(x, gy, Wflip, gx, parts, self.ph, self.pw, need_gx, need_gW)
        out = {0: gx, 1: parts.sum(axis=0) if need_gW else None, 2: gy.sum(axis=(0, 2, 3))}
        return tuple(chainer.Variable(out[i]) for i in indexes)
