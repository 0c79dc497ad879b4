"""ReLU and the residual join ``relu(a + b)`` as single-pass numba kernels.

Both keep Chainer's semantics: ``relu(NaN) = NaN`` (non-finite values reach the
loss and the gradients), and the gradient is ``gy * (y > 0)``. The residual
join's two input gradients are one array, shared (Chainer sums gradients out of
place, so sharing is safe).

Elementwise, they run over the arrays' memory in order, NCHW or channel-major
(:mod:`hpcsgd.kernels.layout`); the output keeps the first input's order, and
an operand in the other order is copied into it first.
"""

from __future__ import annotations

import chainer
import numpy as np
from chainer import function_node
from numba import prange

from hpcsgd.kernels import layout
from hpcsgd.kernels._numba import kernel


@kernel
def _relu_forward(x, y):
    for i in prange(x.size):
        v = x[i]
        y[i] = 0 if v < 0 else v


@kernel
def _add_relu_forward(a, b, y):
    for i in prange(a.size):
        v = a[i] + b[i]
        y[i] = 0 if v < 0 else v


@kernel
def _relu_backward(y, gy, gx):
    for i in prange(y.size):
        gx[i] = gy[i] if y[i] > 0 else 0


@kernel
def _relu_backward2(y, gy1, gy2, gx):
    for i in prange(y.size):
        gx[i] = gy1[i] + gy2[i] if y[i] > 0 else 0


def relu_backward(y: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """``gy * (y > 0)`` in one pass (arrays of the same shape), in ``y``'s memory order."""
    y = layout.dense(y)
    gx = np.empty_like(y, dtype=gy.dtype)
    _relu_backward(layout.flat(y), layout.flat(layout.like(y, gy)), layout.flat(gx))
    return gx


class ReLU(function_node.FunctionNode):
    """``max(x, 0)``; retains its output for the gradient mask."""

    def forward_cpu(self, inputs):
        x = layout.dense(inputs[0])
        y = np.empty_like(x)
        _relu_forward(layout.flat(x), layout.flat(y))
        self.retain_outputs((0,))
        return (y,)

    def backward(self, indexes, grad_outputs):
        (y,) = self.get_retained_outputs()
        return (chainer.Variable(relu_backward(y.array, grad_outputs[0].array)),)


class AddReLU(function_node.FunctionNode):
    """``max(a + b, 0)``: the residual join of a ResNet block, one pass, no temporary.

    ``fork=True``: the output twice (the same array), for a next block that feeds it to
    both its branches. Chainer would sum the two branches' gradients in a separate ``Add``
    node (a new array: two reads and a write); here the backward sums them inside the
    ReLU mask pass, with the same float32 addition, so the gradients are bitwise Chainer's.
    """

    def __init__(self, fork: bool = False):
        self.fork = bool(fork)

    def forward_cpu(self, inputs):
        a, b = inputs
        if a.shape != b.shape:
            raise ValueError(f"add_relu needs equal shapes, got {a.shape} and {b.shape}")
        a = layout.dense(a)
        y = np.empty_like(a, dtype=np.result_type(a.dtype, b.dtype))
        _add_relu_forward(layout.flat(a), layout.flat(layout.like(a, b)), layout.flat(y))
        self.retain_outputs((0,))
        return (y, y) if self.fork else (y,)

    def backward(self, indexes, grad_outputs):
        y = self.get_retained_outputs()[0].array
        gys = [g.array for g in grad_outputs if g is not None]
        if len(gys) == 2:
            y = layout.dense(y)
            gx = np.empty_like(y, dtype=gys[0].dtype)
            g1, g2 = (layout.flat(layout.like(y, g)) for g in gys)
            _relu_backward2(layout.flat(y), g1, g2, layout.flat(gx))
        else:
            gx = relu_backward(y, gys[0])
        g = chainer.Variable(gx)
        return tuple(g for _ in indexes)


def relu(x):
    """ReLU on NumPy inputs (a ``chainer.Variable`` out)."""
    return ReLU().apply((x,))[0]


def add_relu(a, b, fork=False):
    """``relu(a + b)`` on NumPy inputs; ``fork``: two outputs (see :class:`AddReLU`)."""
    out = AddReLU(fork).apply((a, b))
    return out if fork else out[0]
