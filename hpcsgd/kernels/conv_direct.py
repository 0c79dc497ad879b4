"""Direct (im2col-free) convolution for small channel counts, vectorised across images.

Why: with 8-32 channels a convolution's GEMM has 8-32 rows and does a few FLOPs per
byte of its patch matrix, so the im2col path spends its time writing the 9x patch
matrix and reading it back (forward, weight gradient and col2im alike). This
module never builds one. Each task takes a block of ``NB`` images and copies it to
an image-innermost layout ``xb[c, y, x, n]`` (one pass over the activation; the
block stays in cache). In that layout a tap ``(i, j)`` of output row ``oy`` is one
contiguous multiply-add of ``Wo * NB`` floats (stride 1)::

    yb[co, oy, lo:hi, :] += W[co, ci, i, j] * xb[ci, oy + i - ph, lo + j - pw : hi + j - pw, :]

(a long SAXPY that vectorises whatever the map width: no 28-, 14- or 7-float rows
to split into SIMD lanes, no padding copy: the column range ``[lo, hi)`` skips the
taps that fall into the zero padding). At stride 2 the block stores even and odd
input columns as two phases, ``xb[c, y, x % 2, x // 2, n]``, so each tap again reads
one contiguous run. The input gradient at stride 1 is the same operation on
``gy`` with the flipped, transposed kernel and pad ``k - 1 - p``; at stride 2 it is
the adjoint scatter (contiguous too); the weight gradient is a dot product of the
same rows (two loads per multiply-add, no stores). Tasks run in parallel over
image blocks; each keeps its own weight-gradient partial sum, summed at the end.

:func:`applies` says which calls :func:`hpcsgd.kernels.conv.conv2d` routes here
(see ``docs/kernels.md``; measured per layer with ``benchmarks/small_step.py --layers``).
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
DIRECT_MAX_CH = int(os.environ.get("HPCSGD_CONV_DIRECT_MAX_CH", "32"))
#: Fewest input channels routed to the direct path (a 1-channel stem is faster as a GEMM).
DIRECT_MIN_CIN = int(os.environ.get("HPCSGD_CONV_DIRECT_MIN_CIN", "2"))
#: Route 1x1 convolutions at stride 2 here too (off: the GEMM path measured faster on them).
ALLOW_1X1 = os.environ.get("HPCSGD_CONV_DIRECT_1X1", "0") == "1"


def applies(x_shape, w_shape, stride, pad) -> bool:
    """True when :func:`hpcsgd.kernels.conv.conv2d` should take this module for these shapes.

    Equal strides of 1 or 2, a kernel larger than 1x1 that fits the padded
    input (1x1 convolutions are plain GEMMs or strided gathers plus a GEMM, which
    measured faster; ``ALLOW_1X1`` admits them at stride 2), ``DIRECT_MIN_CIN`` to
    ``DIRECT_MAX_CH`` channels.
    """
    if DIRECT_MAX_CH <= 0 or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    (sy, sx), (ph, pw) = stride, pad
    cout, cin, kh, kw = w_shape
    h, w = x_shape[2], x_shape[3]
    return (sy == sx and sx in (1, 2) and (kh * kw > 1 or (ALLOW_1X1 and sx > 1)) and x_shape[1] == cin
            and DIRECT_MIN_CIN <= cin and max(cin, cout) <= DIRECT_MAX_CH
            and 0 <= ph < kh and 0 <= pw < kw and h + 2 * ph >= kh and w + 2 * pw >= kw)


@kernel(parallel=False)
def _to_block(x, n0, m, xb):
    """``xb[c, y, x % S, x // S, k] = x[n0 + k, c, y, x]`` for ``k < m``, zero elsewhere.

    ``S = xb.shape[2]`` column phases: with ``S`` = the stride, every tap of a
    strided convolution reads a contiguous run of one phase.
    """
    n_ch, h, w = x.shape[1], x.shape[2], x.shape[3]
    n_ph, wq, nb = xb.shape[2], xb.shape[3], xb.shape[4]
    for c in range(n_ch):
        for iy in range(h):
            for ix in range(n_ph * wq):
                dst = xb[c, iy, ix % n_ph, ix // n_ph]
                if ix >= w:
                    dst[:] = 0
                    continue
                for k in range(m):
                    dst[k] = x[n0 + k, c, iy, ix]
                for k in range(m, nb):
                    dst[k] = 0


@kernel(parallel=False)
def _from_block(yb, y, n0, m):
    """``y[n0 + k]`` from the block ``yb`` (phased as in :func:`_to_block`), ``k < m``.

    Loops over phase and phase column (no division per element: that cost 2x).
    """
    n_ch, h, w = y.shape[1], y.shape[2], y.shape[3]
    n_ph, wq = yb.shape[2], yb.shape[3]
    for k in range(m):
        for c in range(n_ch):
            for iy in range(h):
                for p in range(n_ph):
                    for q in range(min(wq, (w - p + n_ph - 1) // n_ph)):
                        y[n0 + k, c, iy, q * n_ph + p] = yb[c, iy, p, q, k]


@kernel(parallel=False)
def _tap_table(kw, pw, s, w, wo):
    """Per tap column ``j``: ``(phase, shift, lo, hi)`` as rows of an int64 table.

    Output columns ``lo <= ox < hi`` read input column ``s * ox + j - pw``, inside
    ``[0, w)``, which is entry ``ox + shift`` of column phase ``phase``. ``w`` is the
    block's phase-padded width (its extra columns are zero, so reading them adds nothing).
    """
    tab = np.empty((kw, 4), dtype=np.int64)
    for j in range(kw):
        d = j - pw
        phase = d % s
        lo = max(0, (s - 1 - d) // s)
        tab[j, 0] = phase
        tab[j, 1] = (d - phase) // s
        tab[j, 2] = lo
        tab[j, 3] = max(min(wo, (w - 1 - d) // s + 1), lo)
    return tab


@kernel(parallel=False)
def _conv_block(xb, W, yb, s, ph, pw):
    """``yb = conv(xb, W)`` at stride ``s`` in the block layout (``yb`` overwritten, one phase).

    Output row outer, then input row, then output channel: the ``Cout`` output
    rows of one ``oy`` and the input row in use stay in L1 (plane-at-a-time
    orders streamed the block from L2 once per channel pair). Rows are slices of
    one flat view (a ``reshape`` per row is a C call: 2x slower), and every
    inner loop indexes from 0, so numba emits no negative-index test (which kept
    the loop scalar, 7x slower).
    """
    n_ch, h, n_ph, wq, nb = xb.shape
    cout, _, kh, kw = W.shape
    ho, wo = yb.shape[1], yb.shape[3]
    xf, yf = xb.reshape(xb.size), yb.reshape(yb.size)
    tab = _tap_table(kw, pw, s, n_ph * wq, wo)
    yf[:] = 0
    for oy in range(ho):
        for ci in range(n_ch):
            for i in range(kh):
                iy = oy * s + i - ph
                if iy < 0 or iy >= h:
                    continue
                for co in range(cout):
                    yr = yf[(co * ho + oy) * wo * nb:]
                    for j in range(kw):
                        phase, shift, lo, hi = tab[j, 0], tab[j, 1], tab[j, 2], tab[j, 3]
                        wv = W[co, ci, i, j]
                        ys = yr[lo * nb:hi * nb]
                        xs = xf[(((ci * h + iy) * n_ph + phase) * wq + lo + shift) * nb:]
                        for q in range(ys.shape[0]):
                            ys[q] += wv * xs[q]


@kernel(parallel=False)
def _conv_transpose_block(gyb, W, gxb, s, ph, pw):
    """Adjoint of :func:`_conv_block` (the input gradient): ``gxb`` (phased, overwritten)."""
    cout, ho, _, wo, nb = gyb.shape
    n_ch, h, n_ph, wq, _ = gxb.shape
    kh, kw = W.shape[2], W.shape[3]
    gf, xf = gyb.reshape(gyb.size), gxb.reshape(gxb.size)
    tab = _tap_table(kw, pw, s, n_ph * wq, wo)
    xf[:] = 0
    for oy in range(ho):
        for ci in range(n_ch):
            for i in range(kh):
                iy = oy * s + i - ph
                if iy < 0 or iy >= h:
                    continue
                for co in range(cout):
                    gr = gf[(co * ho + oy) * wo * nb:]
                    for j in range(kw):
                        phase, shift, lo, hi = tab[j, 0], tab[j, 1], tab[j, 2], tab[j, 3]
                        wv = W[co, ci, i, j]
                        gs = gr[lo * nb:hi * nb]
                        xs = xf[(((ci * h + iy) * n_ph + phase) * wq + lo + shift) * nb:]
                        for q in range(gs.shape[0]):
                            xs[q] += wv * gs[q]


@kernel(parallel=False)
def _weight_grad_block(xb, gyb, gW, s, ph, pw):
    """``gW[co, ci, i, j] += sum(gyb[co, oy, ox, :] * x[ci, s*oy + i - ph, s*ox + j - pw, :])``.

    Same loop order and row slicing as :func:`_conv_block` (``gW`` stays in L1).
    """
    n_ch, h, n_ph, wq, nb = xb.shape
    cout, _, kh, kw = gW.shape
    ho, wo = gyb.shape[1], gyb.shape[3]
    xf, gf = xb.reshape(xb.size), gyb.reshape(gyb.size)
    tab = _tap_table(kw, pw, s, n_ph * wq, wo)
    for oy in range(ho):
        for ci in range(n_ch):
            for i in range(kh):
                iy = oy * s + i - ph
                if iy < 0 or iy >= h:
                    continue
                for co in range(cout):
                    gr = gf[(co * ho + oy) * wo * nb:]
                    for j in range(kw):
                        phase, shift, lo, hi = tab[j, 0], tab[j, 1], tab[j, 2], tab[j, 3]
                        gs = gr[lo * nb:hi * nb]
                        xs = xf[(((ci * h + iy) * n_ph + phase) * wq + lo + shift) * nb:]
                        acc = np.float32(0)
                        for q in range(gs.shape[0]):
                            acc += gs[q] * xs[q]
                        gW[co, ci, i, j] += acc


@kernel
def _forward(x, W, y, s, ph, pw):
    """``y = conv(x, W)`` at stride ``s``, NCHW; parallel over blocks of ``NB`` images."""
    n, c, h, w = x.shape
    cout, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    for b in prange((n + NB - 1) // NB):
        n0 = b * NB
        m = min(NB, n - n0)
        xb = np.empty((c, h, s, (w + s - 1) // s, NB), dtype=x.dtype)
        yb = np.empty((cout, ho, 1, wo, NB), dtype=x.dtype)
        _to_block(x, n0, m, xb)
        _conv_block(xb, W, yb, s, ph, pw)
        _from_block(yb, y, n0, m)


@kernel
def _backward(x, gy, W, Wflip, gx, gW_parts, s, ph, pw, need_gx, need_gW):
    """Input gradient ``gx`` (if ``need_gx``) and per-block weight gradients ``gW_parts[b]``.

    At stride 1 the input gradient is the convolution of ``gy`` with ``Wflip[ci, co, i, j] =
    W[co, ci, kh-1-i, kw-1-j]`` at pad ``k-1-p`` (a gather, as fast as the forward); at
    stride 2 it is the scatter :func:`_conv_transpose_block`.
    """
    n, c, h, w = x.shape
    cout, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    kh, kw = W.shape[2], W.shape[3]
    wq = (w + s - 1) // s
    for b in prange((n + NB - 1) // NB):
        n0 = b * NB
        m = min(NB, n - n0)
        gyb = np.empty((cout, ho, 1, wo, NB), dtype=gy.dtype)
        _to_block(gy, n0, m, gyb)
        if need_gW:
            xb = np.empty((c, h, s, wq, NB), dtype=x.dtype)
            _to_block(x, n0, m, xb)
            gW_parts[b, :] = 0
            _weight_grad_block(xb, gyb, gW_parts[b], s, ph, pw)
        if need_gx:
            gxb = np.empty((c, h, s, wq, NB), dtype=gy.dtype)
            if s == 1:
                _conv_block(gyb, Wflip, gxb, 1, kh - 1 - ph, kw - 1 - pw)
            else:
                _conv_transpose_block(gyb, W, gxb, s, ph, pw)
            _from_block(gxb, gx, n0, m)


class DirectConv2D(function_node.FunctionNode):
    """``y = conv2d(x, W) + b``, equal strides of 1 or 2, NCHW NumPy arrays, via the block layout above."""

    def __init__(self, stride, pad):
        self.s = stride[0]
        self.ph, self.pw = pad

    def forward_cpu(self, inputs):
        x, W = np.ascontiguousarray(inputs[0]), np.ascontiguousarray(inputs[1])
        n, _, h, w = x.shape
        cout, _, kh, kw = W.shape
        ho = (h + 2 * self.ph - kh) // self.s + 1
        wo = (w + 2 * self.pw - kw) // self.s + 1
        y = np.empty((n, cout, ho, wo), dtype=x.dtype)
        _forward(x, W, y, self.s, self.ph, self.pw)
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
        Wflip = np.ascontiguousarray(W.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])  # used at stride 1
        _backward(x, gy, W, Wflip, gx, parts, self.s, self.ph, self.pw, need_gx, need_gW)
        out = {0: gx, 1: parts.sum(axis=0) if need_gW else None}
        if 2 in indexes:  # the bias gradient only when there is a bias (a strided pass over gy)
            out[2] = gy.sum(axis=(0, 2, 3))
        return tuple(chainer.Variable(out[i]) for i in indexes)
