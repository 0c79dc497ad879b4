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
