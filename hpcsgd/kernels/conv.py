"""2-D convolution on NumPy: GEMMs on layouts that need no pad, transpose or reshape copies.

Two layouts, chosen per call from the output's pixel count ``P = Ho * Wo``:

* per-image (``P >= BATCHED_BELOW``): the patch matrix is ``col[n]`` of shape
  ``(K, P)`` with ``K = Cin * kh * kw``, and ``y[n] = W @ col[n]`` lands in
  NCHW directly (one stacked ``matmul``, one GEMM per image). A 1x1, stride-1,
  unpadded convolution uses ``x[n]`` itself as ``col[n]``: a direct GEMM with no
  im2col at all.
* batched (small ``P``, the late stages): one GEMM ``(Cout, K) @ (K, N * P)``
  instead of N skinny ones, whose efficiency collapses at ``P`` of 4-49.
  Its output is channel-major, ``(Cout, N * P)``, and is passed on as an NCHW
  view of that memory (:mod:`hpcsgd.kernels.layout`): batch norm, ReLU, the
  residual join and the next batched convolution read it in place, so a
  stage of small maps runs without layout copies. Inputs in either order are
  taken; the per-image layout and the blocked variant copy to NCHW.

im2col/col2im are the numba kernels of :mod:`hpcsgd.kernels.patches`. The
forward patch matrix is kept for the weight gradient (no second im2col in
backward). A stride-1 convolution's input gradient on the batched layout is
itself computed as a convolution of ``gy`` (a gather, see
``Conv2D._gather_input_gradient``) where the patch matrix outweighs the weights.

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

from hpcsgd.kernels import conv_direct, layout
from hpcsgd.kernels.patches import col2im, col2im_cn, im2col, im2col_cn, swap01, swap01_into

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
#: On the batched layout, a stride-1 convolution's input gradient is computed as a convolution
#: (gather) when its patch matrix (K x N*H*W) is at least this many times the weights (C x K).
GATHER_MIN_RATIO = 4


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
        # the batched layout reads NCHW or channel-major input in place; the others want NCHW
        x = layout.dense(x) if self.batched and not self.blocked else np.ascontiguousarray(x)
        W2 = np.ascontiguousarray(W).reshape(cout, k)
        if self.blocked:
            y = np.empty((n, cout, p), dtype=x.dtype)
            col = None
            self._blocked_forward(x, W2, y)
        elif self.batched:
            # col: (K, N*P); y = W2 @ col is (Cout, N, P), handed on channel-major (module doc)
            xt = layout.channel_major(x)
            if self.direct:
                col = xt.reshape(k, n * p) if xt is not None else swap01(x.reshape(n, c, p)).reshape(k, n * p)
            else:
                col = np.empty((k, n * p), dtype=x.dtype)
                rows, cm = layout.rows(x)
                im2col_cn(rows.reshape(n * c, h, w), n, cm, col.reshape(c, kh, kw, n, ho, wo),
                           kh, kw, self.sy, self.sx, self.ph, self.pw)
            yt = (W2 @ col).reshape(cout, n, ho, wo)
            if b is not None:
                yt += b.reshape(cout, 1, 1, 1)
            self.col = col
            self.retain_inputs((1,))
            return (layout.nchw_view(yt),)
        else:
            if self.direct:
                col = x.reshape(n, k, p)
            else:
                col = np.empty((n, k, p), dtype=x.dtype)
                im2col(x, col.reshape(n, c, kh, kw, ho, wo), kh, kw, self.sy, self.sx, self.ph, self.pw)
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
            im2col_cn(x.reshape(m * c, *x.shape[2:]), m, False, col.reshape(c, self.kh, self.kw, m, ho, wo),
                       *args)
            return col.reshape(k, m * p)
        im2col(x, col.reshape(m, c, self.kh, self.kw, ho, wo), *args)
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
                swap01_into(t.reshape(cout, b - a, p), y[a:b])
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
                swap01_into(gy[a:b], g)
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
                    col2im_cn(gcol.reshape(c, self.kh, self.kw, m, ho, wo),
                               gx[a:b].reshape(m * c, *gx.shape[2:]), m, False, *args)
                else:
                    gcol = np.matmul(W2.T, g, out=gbuf[:k * m * p].reshape(m, k, p))
                    col2im(gcol.reshape(m, c, self.kh, self.kw, ho, wo), gx[a:b], *args)
        return out

    def _batched_backward(self, indexes, gy, W):
        """Gradients on the batched layout: ``gy`` read in place when channel-major, ``gx`` made so."""
        cout, k = W.shape[0], W[0].size
        W2 = np.ascontiguousarray(W).reshape(cout, k)
        n, c, h, w = self.x_shape
        ho, wo = self.out_hw
        p = ho * wo
        gy = layout.dense(gy)
        gt = layout.channel_major(gy)
        if gt is None:
            gt = swap01(gy.reshape(n, cout, p))
        gyt = gt.reshape(cout, n * p)
        out = {}
        if 1 in indexes:
            out[1] = (gyt @ self.col.T).reshape(W.shape)
        if 0 in indexes:
            if self._gather_input_gradient(n * h * w, c):
                out[0] = self._input_gradient_as_convolution(gyt, W)
                return self._finish(indexes, out, gyt)
            gcol = W2.T @ gyt
            if self.direct:
                gx = layout.nchw_view(gcol.reshape(c, n, h, w))
            else:
                gxt = np.empty((c * n, h, w), dtype=gy.dtype)  # rows (c, n): channel-major
                col2im_cn(gcol.reshape(c, self.kh, self.kw, n, ho, wo), gxt, n, True,
                           self.kh, self.kw, self.sy, self.sx, self.ph, self.pw)
                gx = layout.nchw_view(gxt.reshape(c, n, h, w))
            out[0] = gx
        return self._finish(indexes, out, gyt)

    @staticmethod
    def _finish(indexes, out, gyt):
        if 2 in indexes:
            out[2] = gyt.sum(axis=1)
        return tuple(chainer.Variable(out[i]) for i in indexes)

    def _gather_input_gradient(self, npix: int, c: int) -> bool:
        """Stride-1 kernels larger than 1x1, where the patch matrix outweighs the weights' copy.

        Why: the input gradient of a stride-1 convolution is itself a convolution of ``gy``
        with the flipped, transposed kernel. Computed so, it gathers (an im2col of ``gy``)
        instead of scattering nine taps into every element (col2im): measured on ResNet-50's
        16x16 maps at batch 32, im2col took 1.9 ms per layer where col2im took 2.8, with the
        same GEMM. The flipped kernel is a copy of the weights, so small maps keep col2im.
        """
        return (not self.direct and self.sy == 1 and self.sx == 1 and self.ph < self.kh
                and self.pw < self.kw and npix >= GATHER_MIN_RATIO * c)

    def _input_gradient_as_convolution(self, gyt, W):
        """``gx = conv(gy, flip(W).T, pad = k - 1 - pad)`` on the batched layout, channel-major out."""
        cout, c, kh, kw = W.shape
        n, _, h, w = self.x_shape
        ho, wo = self.out_hw
        Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(c, cout * kh * kw)
        col = np.empty((cout * kh * kw, n * h * w), dtype=gyt.dtype)
        im2col_cn(gyt.reshape(cout * n, ho, wo), n, True, col.reshape(cout, kh, kw, n, h, w),
                   kh, kw, 1, 1, kh - 1 - self.ph, kw - 1 - self.pw)
        return layout.nchw_view((Wf @ col).reshape(c, n, h, w))

    def backward(self, indexes, grad_outputs):
        retained = [v.array for v in self.get_retained_inputs()]
        W = retained[-1]
        cout, c, kh, kw = W.shape
        n, _, h, w = self.x_shape
        ho, wo = self.out_hw
        p, k = ho * wo, c * kh * kw
        W2 = np.ascontiguousarray(W).reshape(cout, k)
        col = self.col
        if self.batched and not self.blocked:
            return self._batched_backward(indexes, grad_outputs[0].array, W)
        gy = np.ascontiguousarray(grad_outputs[0].array).reshape(n, cout, p)
        out = {}
        if self.blocked:
            out = self._blocked_backward(np.ascontiguousarray(retained[0]), W2, gy, indexes)
            if 1 in out:
                out[1] = out[1].reshape(W.shape)
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
                    col2im(view, gx, kh, kw, self.sy, self.sx, self.ph, self.pw)
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
