"""hpcsgd.kernels.eltwise (ReLU, residual add+ReLU) against Chainer and gradient_check."""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from hpcsgd.kernels import eltwise


def _away_from_zero(rng, shape, dtype=np.float32):
    a = rng.standard_normal(shape)
    return (a + np.sign(a) * 0.1).astype(dtype)


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 1, 1, 1), (3, 4, 2, 2)])
def test_relu_and_add_relu_match_chainer(shape):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    av, bv, ar, br = (chainer.Variable(v.copy()) for v in (a, b, a, b))
    y, yr = eltwise.add_relu(av, bv), F.relu(ar + br)
    y.grad, yr.grad = gy.copy(), gy.copy()
    y.backward()
    yr.backward()
    np.testing.assert_array_equal(y.array, yr.array)
    np.testing.assert_array_equal(av.grad, ar.grad)
    np.testing.assert_array_equal(bv.grad, br.grad)
    xv, xr = chainer.Variable(a.copy()), chainer.Variable(a.copy())
    y, yr = eltwise.relu(xv), F.relu(xr)
    y.grad, yr.grad = gy.copy(), gy.copy()
    y.backward()
    yr.backward()
    np.testing.assert_array_equal(y.array, yr.array)
    np.testing.assert_array_equal(xv.grad, xr.grad)


def test_gradient_check_float64():
    rng = np.random.default_rng(1)
    x = _away_from_zero(rng, (2, 3, 4), np.float64)
    a = _away_from_zero(rng, (2, 3, 4), np.float64)
    gy = rng.standard_normal((2, 3, 4))
    gradient_check.check_backward(eltwise.relu, x, gy, dtype=np.float64, atol=1e-6, rtol=1e-6)
    gradient_check.check_backward(eltwise.add_relu, (a, np.zeros_like(a)), gy, dtype=np.float64,
                                  atol=1e-6, rtol=1e-6)


def test_nan_propagates_like_chainer():
    x = np.array([np.nan, -1.0, 2.0, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(eltwise.relu(x).array, F.relu(x).array)
    np.testing.assert_array_equal(eltwise.add_relu(x, np.ones_like(x)).array, F.relu(x + 1).array)


def test_add_relu_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="equal shapes"):
        eltwise.add_relu(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))


def _two_branch_reference(add_relu_fork, a, b, w1, w2, gy_scale):
    """Loss sum(y1 * w1) + sum(y2 * w2) through the fork; returns (loss, ga, gb)."""
    av, bv = chainer.Variable(a.copy()), chainer.Variable(b.copy())
    y1, y2 = add_relu_fork(av, bv)
    loss = F.sum(y1 * w1) + F.sum(y2 * w2) * gy_scale
    loss.backward()
    return loss.array, av.grad, bv.grad


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (4, 8, 6, 6)])
def test_add_relu_fork_bitwise_equals_chainer_sum(shape):
    """Two outputs, gradients summed inside the mask pass: bitwise Chainer's relu(a + b) used twice."""
    rng = np.random.default_rng(2)
    a, b, w1, w2 = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))

    def chainer_fork(av, bv):
        y = F.relu(av + bv)
        return y, y

    got = _two_branch_reference(lambda av, bv: eltwise.add_relu(av, bv, fork=True), a, b, w1, w2, 1.0)
    ref = _two_branch_reference(chainer_fork, a, b, w1, w2, 1.0)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    y1, y2 = eltwise.add_relu(a, b, fork=True)
    assert y1.array is y2.array  # no copy
    np.testing.assert_array_equal(y1.array, F.relu(a + b).array)


def test_add_relu_fork_one_branch_unused():
    """Only one output reaching the loss: its gradient alone, as without the fork."""
    rng = np.random.default_rng(3)
    a, b, gy = (rng.standard_normal((3, 4, 5)).astype(np.float32) for _ in range(3))
    av, bv = chainer.Variable(a.copy()), chainer.Variable(b.copy())
    _, y2 = eltwise.add_relu(av, bv, fork=True)
    y2.grad = gy.copy()
    y2.backward()
    np.testing.assert_array_equal(av.grad, np.where(a + b > 0, gy, 0))
    np.testing.assert_array_equal(bv.grad, av.grad)


def test_add_relu_fork_gradient_check_float64():
    rng = np.random.default_rng(4)
    a = _away_from_zero(rng, (2, 3, 4), np.float64)
    gys = (rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4)))
    gradient_check.check_backward(lambda x, y: eltwise.add_relu(x, y, fork=True), (a, np.zeros_like(a)),
                                  gys, dtype=np.float64, atol=1e-6, rtol=1e-6)
