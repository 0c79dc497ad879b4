"""hpcsgd.kernels.pool.max_pool2d against Chainer's max_pooling_2d(cover_all=False)."""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from hpcsgd.kernels import pool


def _same_as_chainer(x, k, s, p, rng):
    """Output equal to Chainer's; input gradient equal up to the order of sums over overlaps."""
    xv, xr = chainer.Variable(x.copy()), chainer.Variable(x.copy())
    y, yr = pool.max_pool2d(xv, k, s, p), F.max_pooling_2d(xr, k, s, p, cover_all=False)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    y.grad, yr.grad = gy, gy.copy()
    y.backward()
    yr.backward()
    np.testing.assert_array_equal(y.array, yr.array)
    np.testing.assert_allclose(xv.grad, xr.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 2, 8, 8), (3, 4, 1, 1), (2, 2, 2, 3), (1, 1, 112, 57)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_matches_chainer(shape, k, s, p):
    if shape[2] + 2 * p < k or shape[3] + 2 * p < k:
        pytest.skip("window larger than the padded map")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    _same_as_chainer(x, k, s, p, rng)


def test_max_pool_gradient_check_and_nan():
    rng = np.random.default_rng(1)
    x = rng.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6).astype(np.float64) / 10  # distinct: no ties
    gy = rng.standard_normal((2, 3, 4, 3))
    gradient_check.check_backward(lambda v: pool.max_pool2d(v, 3, 2, 1), x, gy, dtype=np.float64,
                                  eps=1e-3, atol=1e-6, rtol=1e-6)
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = np.nan
    assert np.isnan(pool.max_pool2d(x, 3, 2, 1).array[0, 0, 0, 0])


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 1, 1), (2, 2, 0)])
def test_ties_route_the_gradient_like_chainer(k, s, p):
    """Many equal values: ties go to the first tap in row-major window order, as in Chainer."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 3, (2, 3, 9, 8)).astype(np.float32)
    _same_as_chainer(x, k, s, p, rng)


def test_a_window_of_minus_infinity_routes_the_gradient_to_its_first_input_not_the_padding():
    """Chainer pads with -inf, so an all -inf corner window sends its gradient into the padding
    (lost); here padding never wins: the window's first input gets it."""
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    x[0, 0, 2:, 2:] = 1.0
    xv = chainer.Variable(x)
    y = pool.max_pool2d(xv, 3, 2, 1)
    assert y.array[0, 0, 0, 0] == -np.inf
    y.grad = np.ones(y.shape, np.float32)
    y.backward()
    assert xv.grad[0, 0, 0, 0] == 1.0 and xv.grad.sum() == y.size
