"""Batch normalisation (training and inference), optionally fused with ReLU, in numba.

An activation is read as rows of ``P = H * W`` (:func:`hpcsgd.kernels.layout.rows`:
NCHW or channel-major memory, the output in the input's order); every kernel runs
one channel per task (``prange`` over C). A channel's ``N * P`` values are
read from memory once and then stay in cache for the kernel's later passes,
so a forward costs about one read and one write of the activation and a
backward two reads and one write, against Chainer's chain of whole-array NumPy
temporaries. Statistics sum each image's row in the data's precision and the rows in
float64.

Training forward: ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the
batch's mean and biased variance, then ``max(y, 0)`` when ``relu``.
Gradients (``M = N * P``, ``g = gy * (y > 0)`` with ReLU, else ``gy``)::

    gbeta  = sum(g)              ggamma = sum(g * xhat)
    gx     = gamma * invstd * (g - gbeta / M - xhat * ggamma / M)
"""

from __future__ import annotations

import math

import chainer
import numpy as np
from chainer import function_node
from numba import prange

from hpcsgd.kernels import layout
from hpcsgd.kernels._numba import kernel
from hpcsgd.kernels.layout import row_index


@kernel
def _bn_forward(x, n_img, cm, gamma, beta, eps, relu, y, mean, var, zero):
    """Training forward of one channel per task; ``zero`` is ``0`` in the data's dtype.

    Each image's row of the channel is summed in the data's precision (``zero`` types the
    partial sum), the rows' sums in float64: float64 adds per element halved the vector
    width, and on 7x7 maps (49-float rows) the forward took 3x as long (0.15 -> 0.05 ms at
    32 channels, batch 128). The variance pass centres on the float32 mean.
    """
    n_pix = x.shape[1]
    n_ch = x.shape[0] // n_img
    m = n_img * n_pix
    coef = np.empty((n_ch, 3), x.dtype)  # per-channel constants in the data's precision
    for c in prange(n_ch):
        s = 0.0
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            t = zero
            for p in range(n_pix):
                t += x[r, p]
            s += t
        mu = s / m
        coef[c, 2] = mu
        mu32 = coef[c, 2]
        ss = 0.0
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            t = zero
            for p in range(n_pix):
                d = x[r, p] - mu32
                t += d * d
            ss += t
        v = ss / m
        mean[c] = mu
        var[c] = v
        coef[c, 0] = gamma[c] / math.sqrt(v + eps)
        coef[c, 1] = beta[c]
        sc = coef[c, 0]
        sh = coef[c, 1]
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            for p in range(n_pix):
                t = (x[r, p] - mu32) * sc + sh
                if relu:
                    t = 0 if t < 0 else t
                y[r, p] = t


@kernel
def _bn_backward(x, y, gy, n_img, cm, gamma, mean, var, eps, relu, gx, ggamma, gbeta, zero):
    """Training backward of one channel per task; per-image partial sums as in :func:`_bn_forward`."""
    n_pix = x.shape[1]
    n_ch = x.shape[0] // n_img
    m = n_img * n_pix
    coef = np.empty((n_ch, 4), x.dtype)  # per-channel constants in the data's precision
    for c in prange(n_ch):
        inv = 1.0 / math.sqrt(var[c] + eps)
        coef[c, 3] = mean[c]
        mu32 = coef[c, 3]
        sg = 0.0
        sgx = 0.0
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            tg = zero
            tx = zero
            for p in range(n_pix):
                g = gy[r, p]
                if relu:
                    g = g if y[r, p] > 0 else zero
                tg += g
                tx += g * (x[r, p] - mu32)
            sg += tg
            sgx += tx
        gb = sg
        gg = sgx * inv
        gbeta[c] = gb
        ggamma[c] = gg
        k = gamma[c] * inv
        coef[c, 0] = k
        coef[c, 1] = -k * gb / m
        coef[c, 2] = -k * gg * inv / m
        a = coef[c, 0]
        b = coef[c, 1]
        cx = coef[c, 2]
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            for p in range(n_pix):
                g = gy[r, p]
                if relu:
                    g = g if y[r, p] > 0 else zero
                gx[r, p] = a * g + cx * (x[r, p] - mu32) + b


@kernel
def _affine_forward(x, n_img, cm, scale, shift, relu, y):
    n_pix = x.shape[1]
    n_ch = x.shape[0] // n_img
    for c in prange(n_ch):
        sc = scale[c]
        sh = shift[c]
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            for p in range(n_pix):
                t = x[r, p] * sc + sh
                if relu:
                    t = 0 if t < 0 else t
                y[r, p] = t


@kernel
def _affine_backward(x, y, gy, n_img, cm, scale, mean, relu, gx, sum_g, sum_gxc):
    n_pix = x.shape[1]
    n_ch = x.shape[0] // n_img
    for c in prange(n_ch):
        sc = scale[c]
        mu = mean[c]
        sg = 0.0
        sgx = 0.0
        for n in range(n_img):
            r = row_index(n, c, n_img, n_ch, cm)
            for p in range(n_pix):
                g = gy[r, p]
                if relu:
                    g = g if y[r, p] > 0 else 0
                sg += g
                sgx += g * (x[r, p] - mu)
                gx[r, p] = g * sc
        sum_g[c] = sg
        sum_gxc[c] = sgx


def _dense(a: np.ndarray) -> np.ndarray:
    """``a`` in NCHW or channel-major memory (2-D and 3-D inputs as NCHW), at most one copy."""
    a = layout.dense(a) if a.ndim == 4 else np.ascontiguousarray(a)
    return a if a.ndim >= 3 else a.reshape(a.shape[0], a.shape[1], 1)


def _rows(a: np.ndarray) -> tuple:
    """(rows, channel-major?) of a :func:`_dense` array; rows are views, so kernels write through."""
    return layout.rows(a if a.ndim <= 4 else a.reshape(a.shape[0], a.shape[1], -1))


def _zero(x):
    """The partial sums' zero: the data's float type, at least float32."""
    return np.promote_types(x.dtype, np.float32).type(0)


def _backward_rows(x, y, gy):
    """Rows of ``x``, ``y`` (``x`` without ReLU) and ``gy`` in ``x``'s memory order, and a ``gx`` in it."""
    x = _dense(x)
    x2, cm = _rows(x)
    y2 = _rows(layout.like(x, _dense(y)))[0] if y is not None else x2
    gy2 = _rows(layout.like(x, _dense(gy)))[0]
    return x2, y2, gy2, np.empty_like(x), cm


def _check(x, gamma):
    if x.ndim < 2 or gamma.shape != (x.shape[1],):
        raise ValueError(f"batch_norm: gamma of shape {gamma.shape} does not match input {x.shape}")


class BatchNorm(function_node.FunctionNode):
    """Training-mode batch normalisation with batch statistics (optionally + ReLU).

    After ``apply``, ``self.mean`` and ``self.var`` hold the batch's per-channel
    mean and biased variance (float32 arrays).
    """

    def __init__(self, eps: float = 2e-5, relu: bool = False):
        self.eps = float(eps)
        self.relu = bool(relu)

    def forward_cpu(self, inputs):
        x, gamma, beta = inputs
        _check(x, gamma)
        shape, x = x.shape, _dense(x)
        y = np.empty_like(x)  # the input's memory order
        x2, cm = _rows(x)
        mean = np.empty(x.shape[1], np.float64)
        var = np.empty(x.shape[1], np.float64)
        _bn_forward(x2, x.shape[0], cm, gamma, beta, self.eps, self.relu, _rows(y)[0], mean, var, _zero(x))
        y = y.reshape(shape)
        self._mean64, self._var64 = mean, var
        self.mean, self.var = mean.astype(x.dtype), var.astype(x.dtype)
        self.retain_inputs((0, 1))
        if self.relu:
            self.retain_outputs((0,))
        return (y,)

    def backward(self, indexes, grad_outputs):
        x, gamma = (v.array for v in self.get_retained_inputs())
        x2, y2, gy2, gx, cm = _backward_rows(x, self.get_retained_outputs()[0].array if self.relu else None,
                                             grad_outputs[0].array)
        ggamma = np.empty(gamma.shape, np.float64)
        gbeta = np.empty(gamma.shape, np.float64)
        _bn_backward(x2, y2, gy2, x.shape[0], cm, gamma, self._mean64, self._var64, self.eps, self.relu,
                     _rows(gx)[0], ggamma, gbeta, _zero(x))
        out = (gx.reshape(x.shape), ggamma.astype(gamma.dtype), gbeta.astype(gamma.dtype))
        return tuple(chainer.Variable(out[i]) for i in indexes)


class FixedBatchNorm(function_node.FunctionNode):
    """Inference batch normalisation with given statistics (optionally + ReLU)."""

    def __init__(self, eps: float = 2e-5, relu: bool = False):
        self.eps = float(eps)
        self.relu = bool(relu)

    def forward_cpu(self, inputs):
        x, gamma, beta, mean, var = inputs
        _check(x, gamma)
        shape, x = x.shape, _dense(x)
        self._inv = 1.0 / np.sqrt(var.astype(np.float64) + self.eps)
        scale = gamma * self._inv
        shift = beta - mean * scale
        y = np.empty_like(x)
        x2, cm = _rows(x)
        _affine_forward(x2, x.shape[0], cm, scale.astype(x.dtype), shift.astype(x.dtype), self.relu,
                        _rows(y)[0])
        y = y.reshape(shape)
        self.retain_inputs((0, 1, 3))
        if self.relu:
            self.retain_outputs((0,))
        return (y,)

    def backward(self, indexes, grad_outputs):
        x, gamma, mean = (v.array for v in self.get_retained_inputs())
        x2, y2, gy2, gx, cm = _backward_rows(x, self.get_retained_outputs()[0].array if self.relu else None,
                                             grad_outputs[0].array)
        scale = (gamma * self._inv).astype(x.dtype)
        sum_g = np.empty(gamma.shape, np.float64)
        sum_gxc = np.empty(gamma.shape, np.float64)
        _affine_backward(x2, y2, gy2, x.shape[0], cm, scale, mean.astype(np.float64), self.relu, _rows(gx)[0],
                         sum_g, sum_gxc)
        gx = gx.reshape(x.shape)
        inv = self._inv
        ggamma = sum_gxc * inv
        gmean = -gamma * inv * sum_g
        gvar = -0.5 * gamma * inv**3 * sum_gxc
        dt = gamma.dtype
        out = (gx, ggamma.astype(dt), sum_g.astype(dt), gmean.astype(dt), gvar.astype(dt))
        return tuple(chainer.Variable(out[i]) for i in indexes)


def batch_norm(x, gamma, beta, eps=2e-5, relu=False):
    """ops contract: ``(y, mean, var)`` with plain per-channel arrays (biased variance)."""
    node = BatchNorm(eps, relu)
    (y,) = node.apply((x, gamma, beta))
    return y, node.mean, node.var


def fixed_batch_norm(x, gamma, beta, mean, var, eps=2e-5, relu=False):
    """ops contract: inference-mode normalisation with the given statistics."""
    return FixedBatchNorm(eps, relu).apply((x, gamma, beta, mean, var))[0]
