"""Direct (im2col-free) convolution for small channel counts, vectorised across images.

Why: with 8-32 channels a convolution's GEMM has 8-32 rows and does a few FLOPs per
byte of its patch matrix, so the im2col path spends its time writing the 9x patch
matrix and reading it back (forward, weight gradient and col2im alike). This
module never builds one. Each task takes a block of ``NB`` images and copies it to
an image-innermost layout ``xb[c, y, phase, q, n]`` (one pass over the activation;
the block stays in cache): zero-padded columns ``x + pad`` split into ``s`` column
phases (``q = (x + pad) // s``, ``phase = (x + pad) % s``), so that every tap of a
convolution at stride ``s`` reads contiguous runs of ``NB``-float vectors.

Every pass is then a *gather* over a tap table built in Python (:mod:`.conv_taps`):
output ``(row r, phase p, column q)`` sums ``Wt[cd, cs, k_t] * src[cs, off_t + q]`` over
source channels ``cs`` and taps ``t``. The forward and the input gradient (stride 1 or
2: the adjoint, with ``W`` transposed, is a gather too) run through one register-tiled
kernel, :func:`_gather_conv`, that keeps ``COT`` output channels x ``OXT`` columns x
``NB`` images in vector registers across all ``Cin x kh x kw`` taps and stores them
once (the earlier kernel loaded and stored its output row around every multiply-add:
store-bound, 3-4x slower). The weight gradient keeps ``GCT`` output channels x ``JT``
taps of vector partial sums in registers over up to ``ROW_POSITIONS`` output positions
(:func:`_weight_grad`). The tile shapes depend on the CPU's vector registers (:data:`TILES`:
AVX-512 or AVX2). Tasks run in parallel over image blocks; each keeps its own
weight-gradient partial sum, summed at the end.

:func:`applies` says which calls :func:`hpcsgd.kernels.conv.conv2d` routes here
(see ``docs/kernels.md``; measured per layer with ``benchmarks/small_step.py --layers``).
"""

from __future__ import annotations

import os

import chainer
import numba
import numpy as np
from chainer import function_node
from numba import prange

from hpcsgd.kernels import conv_taps
from hpcsgd.kernels._numba import host_vector_class, kernel, stack_scratch
from hpcsgd.kernels.conv_taps import ceil_div

#: Images per block: the vector length of the inner loops (32 measured 10-30% faster than 16
#: on 7-14 px maps with the earlier row kernels, equal on 28 px).
NB = 32
#: Register tiles per vector class, ``(COT, OXT, GCT)``: :func:`_gather_conv` keeps ``COT``
#: output channels x ``OXT`` output columns x ``NB`` images, :func:`_weight_grad` ``GCT`` output
#: channels x ``JT`` taps x ``NB`` images of partial sums in registers.
#:
#: * ``avx512`` (32 registers of 16 floats): 4 x 3 x 32 floats, 24 registers. 2x4, 3x4, 1x8
#:   measured 10-40% slower, 2x6, 2x7, 3x5 and 4x2 1.5-5x slower on AMD Zen 5.
#: * ``avx2`` (16 registers of 8 floats): 1 x 3 x 32 floats, 12 registers. The 4 x 3 tile
#:   needs 48 and spilled to the stack: the 8-channel 28x28 layer took 8.8 / 7.3 / 9.5 ms
#:   (forward / input / weight gradient per 128 images) on AMD Zen 3, 10-20x Zen 5's time.
#:
#: The class is the host's (:func:`._numba.host_vector_class`); ``HPCSGD_CONV_DIRECT_TILES``
#: forces one (tests run both), and then these kernels are not cached on disk: numba's cache
#: key sees the CPU but not module constants, so a forced choice must never meet a cache.
TILES = {"avx512": (4, 3, 4), "avx2": (1, 3, 1)}
_FORCED = os.environ.get("HPCSGD_CONV_DIRECT_TILES", "")
VECTOR_CLASS = _FORCED or host_vector_class()
if VECTOR_CLASS not in TILES:
    raise ValueError(f"HPCSGD_CONV_DIRECT_TILES={_FORCED!r}: choose one of {sorted(TILES)}")
COT, OXT, GCT = TILES[VECTOR_CLASS]
JT = 3  # taps per weight-gradient tile (the kernel below is written for 3)
_CACHE = not _FORCED
#: Gather runs of 3 adjacent-column taps as one (:func:`.conv_taps.group_rows`) with the AVX2
#: tile: 5 column loads instead of 9 per run and one table entry instead of three. On AMD Zen 3
#: the inner loop alone went from 10.8 to 5.6 cycles per tap; a whole 3x3 layer's forward 10-22%
#: faster on 28x28 and 14x14 maps (7x7: level, the block copies dominate). (The AVX-512 tile's
#: 24 accumulators leave no registers for the 5 columns.)
ROW_GROUPS = VECTOR_CLASS == "avx2"
_ACC = COT * OXT * NB
_GACC = GCT * JT * NB
#: Output positions (rows x ``wo``) per register-tile reduction of :func:`_weight_grad`.
ROW_POSITIONS = int(os.environ.get("HPCSGD_CONV_DIRECT_ROW_POSITIONS", "224"))
#: Largest channel count (in and out) routed to the direct path; 0 switches it off.
DIRECT_MAX_CH = int(os.environ.get("HPCSGD_CONV_DIRECT_MAX_CH", "32"))
#: Fewest input channels routed to the direct path (1: since the register-tiled kernels the
#: 1-channel stem is faster here than as a GEMM, step 38-51 -> 36-41 ms on a loaded Zen 5).
DIRECT_MIN_CIN = int(os.environ.get("HPCSGD_CONV_DIRECT_MIN_CIN", "1"))
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


@kernel(parallel=False, cache=_CACHE)
def _to_block(x, n0, m, xb, left):
    """``xb[c, y, (x + left) % S, (x + left) // S, k] = x[n0 + k, c, y, x]`` for ``k < m``, zero elsewhere.

    ``S = xb.shape[2]`` column phases; channels past ``x``'s (tile padding) are zero. Images
    are indexed through a ``(m, w)`` slice per row (``x[n0 + k]`` made numba test ``n0 + k``
    for a negative index and multiply by the stride for every element: 2x slower).
    """
    n_ch, h, w = x.shape[1], x.shape[2], x.shape[3]
    c_blk, n_ph, wq, nb = xb.shape[0], xb.shape[2], xb.shape[3], xb.shape[4]
    x2 = x.reshape(x.shape[0], n_ch * h * w)
    for c in range(c_blk):
        for iy in range(h):
            row = xb[c, iy]
            if c >= n_ch:
                row[:] = 0
                continue
            o = (c * h + iy) * w
            sub = x2[n0:n0 + m, o:o + w]
            for pc in range(n_ph * wq):
                dst = row[pc % n_ph, pc // n_ph]
                ix = pc - left
                if ix < 0 or ix >= w:
                    dst[:] = 0
                    continue
                for k in range(m):
                    dst[k] = sub[k, ix]
                for k in range(m, nb):
                    dst[k] = 0


@kernel(parallel=False, cache=_CACHE)
def _from_block(yb, y, n0, m):
    """``y[n0 + k, c, iy, q * S + p] = yb[c, iy, p, q, k]``, ``k < m`` (``S`` phases, extra columns dropped).

    Loops over phase and phase column (no division per element: that cost 2x), images
    through a ``(m, w)`` slice per row as in :func:`_to_block`.
    """
    n_ch, h, w = y.shape[1], y.shape[2], y.shape[3]
    n_ph, wq = yb.shape[2], yb.shape[3]
    y2 = y.reshape(y.shape[0], n_ch * h * w)
    for c in range(n_ch):
        for iy in range(h):
            o = (c * h + iy) * w
            sub = y2[n0:n0 + m, o:o + w]
            row = yb[c, iy]
            for p in range(n_ph):
                for q in range(min(wq, (w - p + n_ph - 1) // n_ph)):
                    src = row[p, q]
                    for k in range(m):
                        sub[k, q * n_ph + p] = src[k]


@kernel(parallel=False, cache=_CACHE)
def _gather_conv(src, Wt, groups, gcounts, taps, counts, dst):
    """``dst[cd, r, p, q] = sum_{cs, t < counts[r, p]} Wt[cd, cs, k_t] * src[cs][off_t + q]`` (overwritten).

    With :data:`ROW_GROUPS`, ``groups[r, p]`` holds runs of 3 taps on adjacent columns
    (:func:`.conv_taps.group_rows`; ``OXT`` must be 3): the 5 columns a 3-column tile needs
    for them are loaded once, and ``taps`` holds the other taps.

    ``src[cs]`` is one channel of the source block, flat; each term is ``NB`` images.
    Tiles of ``COT`` channels x ``OXT`` columns accumulate in a stack scratch (vector
    registers) over every channel and tap, then go to ``dst`` in one store. Inner loops
    index slices from 0 (numba then emits no negative-index test, which made gathers).
    """
    c_src = src.shape[0]
    cstride = src.size // c_src
    cd_n, n_r, n_p, qd = dst.shape[0], dst.shape[1], dst.shape[2], dst.shape[3]
    sf, df = src.reshape(src.size), dst.reshape(dst.size)
    acc = numba.carray(stack_scratch(src, _ACC), _ACC)
    for r in range(n_r):
        for p in range(n_p):
            n_t, n_g = counts[r, p], gcounts[r, p]
            for q0 in range(0, qd, OXT):
                for cd0 in range(0, cd_n, COT):
                    for a in range(_ACC):
                        acc[a] = 0
                    for cs in range(c_src):
                        if ROW_GROUPS:
                            for g in range(n_g):
                                base = cs * cstride + groups[r, p, g, 3] + q0 * NB
                                xs = sf[base:base + 5 * NB]
                                for c in range(COT):
                                    wa = Wt[cd0 + c, cs, groups[r, p, g, 0]]
                                    wb = Wt[cd0 + c, cs, groups[r, p, g, 1]]
                                    wc = Wt[cd0 + c, cs, groups[r, p, g, 2]]
                                    o = c * OXT * NB
                                    for u in range(NB):
                                        x0, x1, x2 = xs[u], xs[NB + u], xs[2 * NB + u]
                                        x3, x4 = xs[3 * NB + u], xs[4 * NB + u]
                                        acc[o + u] += wa * x0 + wb * x1 + wc * x2
                                        acc[o + NB + u] += wa * x1 + wb * x2 + wc * x3
                                        acc[o + 2 * NB + u] += wa * x2 + wb * x3 + wc * x4
                        for t in range(n_t):
                            k = taps[r, p, t, 0]
                            base = cs * cstride + taps[r, p, t, 1] + q0 * NB
                            xs = sf[base:base + OXT * NB]
                            for c in range(COT):
                                wv = Wt[cd0 + c, cs, k]
                                for a in range(OXT * NB):
                                    acc[c * OXT * NB + a] += wv * xs[a]
                    for c in range(COT):
                        o = ((((cd0 + c) * n_r + r) * n_p + p) * qd + q0) * NB
                        ds = df[o:o + OXT * NB]
                        for a in range(OXT * NB):
                            ds[a] = acc[c * OXT * NB + a]


@kernel(parallel=False, cache=_CACHE)
def _fold(acc):
    """Sum each ``NB``-vector of ``acc`` into its first element (a tree of vector adds).

    Constant halving steps: a runtime step made LLVM compare the scratch's address with
    itself, which counts as taking its address, and then no loop kept it in registers.
    """
    for u in range(acc.size // NB):
        for q in range(16):
            acc[u * NB + q] += acc[u * NB + q + 16]
        for q in range(8):
            acc[u * NB + q] += acc[u * NB + q + 8]
        for q in range(4):
            acc[u * NB + q] += acc[u * NB + q + 4]
        for q in range(2):
            acc[u * NB + q] += acc[u * NB + q + 2]
        acc[u * NB] += acc[u * NB + 1]


@kernel(parallel=False, cache=_CACHE)
def _weight_grad(xb, gyb, s, ph, lg, wo, rows, gW):
    """``gW[co, ci, i, j] += sum_{oy, ox, n} gy[co, oy, ox, n] * x[ci, s*oy + i - ph, s*ox + j - pw, n]``.

    ``gW`` is ``(Cout, Cin, kh, kw)`` with ``kw`` a multiple of ``JT`` (the extra taps read
    padding and are dropped). For ``rows`` output rows at a time, per input channel,
    kernel row, ``JT`` taps and ``GCT`` output channels: ``GCT x JT`` vectors of ``NB``
    partial sums stay in registers over the rows (each ``x`` load feeds ``GCT``
    multiply-adds, each ``gy`` load ``JT``), then are reduced into ``gW``. ``rows`` trades
    the reductions (one per ``rows * wo`` positions) against L1 reuse of the rows.
    """
    cin, h, n_ph, qx = xb.shape[0], xb.shape[1], xb.shape[2], xb.shape[3]
    co_n, ho, qg = gyb.shape[0], gyb.shape[1], gyb.shape[3]
    kh, kw = gW.shape[2], gW.shape[3]
    xrow, grow = n_ph * qx * NB, qg * NB
    xf, gf = xb.reshape(xb.size), gyb.reshape(gyb.size)
    acc = numba.carray(stack_scratch(xb, _GACC), _GACC)
    n = wo * NB
    for oy0 in range(0, ho, rows):
        for ci in range(cin):
            for i in range(kh):
                lo = max(oy0, (ph - i + s - 1) // s)
                hi = min(oy0 + rows, ho, (h - 1 + ph - i) // s + 1)
                for j0 in range(0, kw, JT):
                    xo = ((ci * h + s * lo + i - ph) * n_ph) * qx * NB
                    o0 = xo + ((j0 % s) * qx + j0 // s) * NB
                    o1 = xo + (((j0 + 1) % s) * qx + (j0 + 1) // s) * NB
                    o2 = xo + (((j0 + 2) % s) * qx + (j0 + 2) // s) * NB
                    for co0 in range(0, co_n, GCT):
                        g = ((co0 * ho + lo) * qg + lg) * NB
                        gs = ho * grow
                        for a in range(_GACC):
                            acc[a] = 0
                        for r in range(hi - lo):
                            xr, gr = r * s * xrow, g + r * grow
                            x0, x1 = xf[o0 + xr:o0 + xr + n], xf[o1 + xr:o1 + xr + n]
                            x2 = xf[o2 + xr:o2 + xr + n]
                            g0 = gf[gr:gr + n]
                            if GCT == 1:  # the AVX2 tile: 3 taps x NB; slices from 0 (no gathers)
                                for ox in range(wo):
                                    e = ox * NB
                                    gv, y0 = g0[e:e + NB], x0[e:e + NB]
                                    y1, y2 = x1[e:e + NB], x2[e:e + NB]
                                    for q in range(NB):
                                        v = gv[q]
                                        acc[q] += v * y0[q]
                                        acc[NB + q] += v * y1[q]
                                        acc[2 * NB + q] += v * y2[q]
                                continue
                            g1 = gf[gr + gs:gr + gs + n]
                            g2, g3 = gf[gr + 2 * gs:gr + 2 * gs + n], gf[gr + 3 * gs:gr + 3 * gs + n]
                            for ox in range(wo):
                                for q in range(NB):
                                    e = ox * NB + q
                                    a0, a1, a2 = x0[e], x1[e], x2[e]
                                    v = g0[e]
                                    acc[q] += v * a0
                                    acc[NB + q] += v * a1
                                    acc[2 * NB + q] += v * a2
                                    v = g1[e]
                                    acc[3 * NB + q] += v * a0
                                    acc[4 * NB + q] += v * a1
                                    acc[5 * NB + q] += v * a2
                                    v = g2[e]
                                    acc[6 * NB + q] += v * a0
                                    acc[7 * NB + q] += v * a1
                                    acc[8 * NB + q] += v * a2
                                    v = g3[e]
                                    acc[9 * NB + q] += v * a0
                                    acc[10 * NB + q] += v * a1
                                    acc[11 * NB + q] += v * a2
                        _fold(acc)
                        for c in range(GCT):
                            for jt in range(JT):
                                gW[co0 + c, ci, i, j0 + jt] += acc[(c * JT + jt) * NB]


@kernel(cache=_CACHE)
def _forward(x, Wt, groups, gcounts, taps, counts, y, xbs, pw, qy):
    """``y = conv(x, W)``, NCHW, parallel over blocks of ``NB`` images; ``xbs[b]``: block ``b`` of ``x``."""
    n = x.shape[0]
    ho = y.shape[2]
    for b in prange((n + NB - 1) // NB):
        n0 = b * NB
        m = min(NB, n - n0)
        yb = np.empty((Wt.shape[0], ho, 1, qy, NB), dtype=x.dtype)
        _to_block(x, n0, m, xbs[b], pw)
        _gather_conv(xbs[b], Wt, groups, gcounts, taps, counts, yb)
        _from_block(yb, y, n0, m)


@kernel(cache=_CACHE)
def _backward(xbs, gy, WtT, bgroups, bgcounts, btaps, bcounts, gx, gW_parts, s, ph, qg, lg, qgx, rows,
              need_gx, need_gW):
    """Input gradient ``gx`` (if ``need_gx``) and per-block weight gradients ``gW_parts[b]``.

    The input gradient gathers ``gy`` with ``WtT[ci, co, k] = W[co, ci, k]`` over the
    adjoint's taps (:func:`.conv_taps.bwd_taps`); ``gy``'s block is shared with the weight gradient,
    which reads the forward's blocks of ``x``, ``xbs``.
    """
    n, ho, wo = gy.shape[0], gy.shape[2], gy.shape[3]
    h = xbs.shape[2]
    for b in prange((n + NB - 1) // NB):
        n0 = b * NB
        m = min(NB, n - n0)
        gyb = np.empty((WtT.shape[1], ho, 1, qg, NB), dtype=gy.dtype)
        _to_block(gy, n0, m, gyb, lg)
        if need_gW:
            gW_parts[b, :] = 0
            _weight_grad(xbs[b], gyb, s, ph, lg, wo, rows, gW_parts[b])
        if need_gx:
            gxb = np.empty((WtT.shape[0], h, s, qgx, NB), dtype=gy.dtype)
            _gather_conv(gyb, WtT, bgroups, bgcounts, btaps, bcounts, gxb)
            _from_block(gxb, gx, n0, m)


def _padded(W, rows: int, cols: int):
    """``W`` as ``(rows, cols, kh*kw)``, zero-padded in its first two axes (tile multiples)."""
    out = np.zeros((rows, cols, W.shape[2] * W.shape[3]), dtype=W.dtype)
    out[:W.shape[0], :W.shape[1]] = W.reshape(W.shape[0], W.shape[1], -1)
    return out


class DirectConv2D(function_node.FunctionNode):
    """``y = conv2d(x, W) + b``, equal strides of 1 or 2, NCHW NumPy arrays, via the block layout above.

    Keeps the forward's image blocks of ``x`` (about ``x``'s size) for the weight gradient
    instead of ``x``: the backward then copies only ``gy`` into blocks (copies were a
    third of a layer's time once the kernels were register-tiled).
    """

    def __init__(self, stride, pad):
        self.s = stride[0]
        self.ph, self.pw = pad

    def _plan(self, x, W) -> conv_taps.Plan:
        kh, kw = W.shape[2], W.shape[3]
        return conv_taps.plan(x.shape[2], x.shape[3], kh, kw, self.s, self.ph, self.pw, NB, OXT, JT,
                              ROW_GROUPS)

    def forward_cpu(self, inputs):
        x, W = np.ascontiguousarray(inputs[0]), np.ascontiguousarray(inputs[1])
        plan = self._plan(x, W)
        cout = W.shape[0]
        n, c, h, _ = x.shape
        y = np.empty((n, cout, plan.ho, plan.wo), dtype=x.dtype)
        Wt = _padded(W, ceil_div(cout, COT) * COT, c)
        xbs = np.empty((ceil_div(n, NB), c, h, self.s, plan.qx, NB), dtype=x.dtype)
        _forward(x, Wt, *plan.fwd, y, xbs, self.pw, plan.qy)
        if len(inputs) == 3:
            y += inputs[2].reshape(1, cout, 1, 1)
        self.retain_inputs((1,))
        self._xbs, self._x_shape, self._plan_ = xbs, x.shape, plan
        return (y,)

    def backward(self, indexes, grad_outputs):
        W = np.ascontiguousarray(self.get_retained_inputs()[0].array)
        gy = np.ascontiguousarray(grad_outputs[0].array)
        plan, xbs = self._plan_, self._xbs
        need_gx, need_gW = 0 in indexes, 1 in indexes
        cout, cin, kh, kw = W.shape
        cout_p = ceil_div(cout, max(GCT, COT)) * max(GCT, COT)
        gx = np.empty(self._x_shape, dtype=W.dtype) if need_gx else np.empty((1, 1, 1, 1), dtype=W.dtype)
        parts = np.empty((len(xbs) if need_gW else 1, cout_p, cin, kh, plan.kwp), dtype=W.dtype)
        WtT = _padded(W.transpose(1, 0, 2, 3), ceil_div(cin, COT) * COT, cout_p)
        rows = max(1, ROW_POSITIONS // plan.wo)
        _backward(xbs, gy, WtT, *plan.bwd, gx, parts, self.s, self.ph, plan.qg, plan.lg, plan.qgx, rows,
                  need_gx, need_gW)
        gW = np.ascontiguousarray(parts.sum(axis=0)[:cout, :, :, :kw]) if need_gW else None
        out = {0: gx, 1: gW}
        if 2 in indexes:  # the bias gradient only when there is a bias (a strided pass over gy)
            out[2] = gy.sum(axis=(0, 2, 3))
        return tuple(chainer.Variable(out[i]) for i in indexes)
