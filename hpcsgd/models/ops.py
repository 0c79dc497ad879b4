"""The few array operations the models are built from, behind one switch.

Models in :mod:`hpcsgd.models` call these functions instead of
``chainer.functions`` directly. By default they are Chainer's own functions
(cuDNN on CuPy). :func:`hpcsgd.kernels.enable` replaces them, for NumPy
inputs only, with hpcsgd's fused CPU kernels; CuPy inputs always take
Chainer's path. Each function takes and returns ``chainer.Variable``s.

Contract (every backend must keep it):

* ``conv2d(x, W, b, stride, pad)`` -> y (NCHW, no dilation, no groups).
* ``batch_norm(x, gamma, beta, eps, relu)`` -> ``(y, mean, var)``: training
  mode with batch statistics; ``mean`` and ``var`` are plain arrays (biased
  variance, per channel) for the link to keep; ``relu`` fuses max(0, .).
* ``fixed_batch_norm(x, gamma, beta, mean, var, eps, relu)`` -> y: inference.
* ``add_relu(a, b, fork=False)`` -> relu(a + b), the residual join; ``fork=True`` -> the
  output twice ``(y1, y2)``, for a consumer that uses it in two branches (a backend may sum
  their gradients itself; values and gradients are those of ``y`` used twice).
* ``relu(x)`` -> y.
* ``max_pool2d(x, ksize, stride=None, pad=0)`` -> y, floor mode
  (``cover_all=False``: the ResNet stem's 3x3/2 pad-1 pooling); added for the
  models, existing signatures unchanged.
"""

from __future__ import annotations

import chainer
import chainer.functions as F
from chainer.backends import cuda


def _chainer_conv2d(x, W, b=None, stride=1, pad=0):
    return F.convolution_2d(x, W, b, stride=stride, pad=pad)


def _chainer_batch_norm(x, gamma, beta, eps=2e-5, relu=False):
    xd = x.array if isinstance(x, chainer.Variable) else x
    xp = cuda.get_array_module(xd)
    axes = (0,) + tuple(range(2, xd.ndim))
    mean = xd.mean(axis=axes)
    var = xd.var(axis=axes)
    y = F.batch_normalization(x, gamma, beta, eps=eps)
    if relu:
        y = F.relu(y)
    return y, xp.asarray(mean), xp.asarray(var)


def _chainer_fixed_batch_norm(x, gamma, beta, mean, var, eps=2e-5, relu=False):
    y = F.fixed_batch_normalization(x, gamma, beta, mean, var, eps=eps)
    return F.relu(y) if relu else y


def _chainer_add_relu(a, b, fork=False):
    y = F.relu(a + b)
    return (y, y) if fork else y


def _chainer_max_pool2d(x, ksize, stride=None, pad=0):
    return F.max_pooling_2d(x, ksize, stride=stride, pad=pad, cover_all=False)


CHAINER_IMPL = {
    "conv2d": _chainer_conv2d,
    "batch_norm": _chainer_batch_norm,
    "fixed_batch_norm": _chainer_fixed_batch_norm,
    "add_relu": _chainer_add_relu,
    "relu": F.relu,
    "max_pool2d": _chainer_max_pool2d,
}

# The CPU (NumPy) implementation in use; hpcsgd.kernels.enable() swaps entries.
CPU_IMPL = dict(CHAINER_IMPL)


def _impl(name, x):
    xd = x.array if isinstance(x, chainer.Variable) else x
    if isinstance(xd, cuda.ndarray) if cuda.available else False:
        return CHAINER_IMPL[name]
    return CPU_IMPL[name]


def conv2d(x, W, b=None, stride=1, pad=0):
    return _impl("conv2d", x)(x, W, b, stride, pad)


def batch_norm(x, gamma, beta, eps=2e-5, relu=False):
    return _impl("batch_norm", x)(x, gamma, beta, eps, relu)


def fixed_batch_norm(x, gamma, beta, mean, var, eps=2e-5, relu=False):
    return _impl("fixed_batch_norm", x)(x, gamma, beta, mean, var, eps, relu)


def add_relu(a, b, fork=False):
    return _impl("add_relu", a)(a, b, fork)


def relu(x):
    return _impl("relu", x)(x)


def max_pool2d(x, ksize, stride=None, pad=0):
    return _impl("max_pool2d", x)(x, ksize, stride, pad)
