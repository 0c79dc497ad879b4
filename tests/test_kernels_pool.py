"""hpcsgd.kernels.pool.max_pool2d against Chainer's max_pooling_2d(cover_all=False)."""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from hpcsgd.kernels import pool


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 2, 8, 8), (3, 4, 1, 1), (2, 2, 2, 3), (1, 1, 112, 57)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_matches_chainer(shape, k, s, p):
    if shape[2] + 2 * p < k or shape[3] + 2 * p < k:
        pytest.skip("window larger than the padded map")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    xv, xr = chainer.Variable(x.copy()), chainer.Variable(x.copy())
    y, yr = pool.max_pool2d(xv, k, s, p), F.max_pooling_2d(xr, k, s, p, cover_all=False)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    y.grad, yr.grad = gy, gy.copy()
    y.backward()
    yr.backward()
    np.testing.assert_array_equal(y.array, yr.array)
    np.testing.assert_allclose(xv.grad, xr.grad, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_check_and_nan():
    rng = np.random.default_rng(1)
    x = rng.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6).astype(np.float64) / 10  # distinct: no ties
    gy = rng.standard_normal((2, 3, 4, 3))
    gradient_check.check_backward(lambda v: pool.max_pool2d(v, 3, 2, 1), x, gy, dtype=np.float64,
                                  eps=1e-3, atol=1e-6, rtol=1e-6)
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = np.nan
    assert np.isnan(pool.max_pool2d(x, 3, 2, 1).array[0, 0, 0, 0])
