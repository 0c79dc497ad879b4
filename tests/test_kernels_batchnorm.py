"""hpcsgd.kernels.batchnorm against Chainer's batch_normalization (+ relu) and gradient_check."""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from hpcsgd.kernels import batchnorm as bn

# (N, C, H, W): ResNet maps at small channel counts, odd sizes, batch 1, 1x1 maps
SHAPES = [(2, 3, 7, 5), (1, 4, 9, 9), (5, 6, 1, 1), (3, 2, 4, 4), (8, 3, 2, 2)]


def _vars(*arrays):
    return [chainer.Variable(a.copy()) for a in arrays]


def _inputs(shape, seed, offset=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    gamma = (rng.random(shape[1]) + 0.5).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    return x, gamma, beta, gy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_matches_chainer(shape, relu):
    x, gamma, beta, gy = _inputs(shape, sum(shape))
    eps = 1e-5
    xv, gv, bv = _vars(x, gamma, beta)
    y, mean, var = bn.batch_norm(xv, gv, bv, eps, relu)
    xr, gr, br = _vars(x, gamma, beta)
    yr = F.batch_normalization(xr, gr, br, eps=eps)
    yr = F.relu(yr) if relu else yr
    y.grad, yr.grad = gy.copy(), gy.copy()
    y.backward()
    yr.backward()
    axes = (0, 2, 3)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=axes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=axes), rtol=1e-4, atol=1e-5)
    assert isinstance(mean, np.ndarray) and mean.shape == (shape[1],) and var.dtype == np.float32
    for name, g, r in (("y", y.array, yr.array), ("gx", xv.grad, xr.grad), ("ggamma", gv.grad, gr.grad),
                       ("gbeta", bv.grad, br.grad)):
        assert g.dtype == np.float32 and g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-4, err_msg=f"{name} for {shape} relu={relu}")


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_gradient_check_float64(relu):
    x, gamma, beta, gy = (a.astype(np.float64) for a in _inputs((3, 2, 3, 5), 7, offset=0.0))
    if relu:  # keep outputs away from the ReLU kink, where finite differences are meaningless
        beta = beta + 3.0
    gradient_check.check_backward(lambda x, g, b: bn.batch_norm(x, g, b, 1e-5, relu)[0], (x, gamma, beta), gy,
                                  dtype=np.float64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_fixed_batch_norm_matches_chainer(relu):
    x, gamma, beta, gy = _inputs((2, 4, 5, 3), 11)
    rng = np.random.default_rng(12)
    mean = rng.standard_normal(4).astype(np.float32)
    var = (rng.random(4) + 0.1).astype(np.float32)
    got = _vars(x, gamma, beta, mean, var)
    ref = _vars(x, gamma, beta, mean, var)
    y = bn.fixed_batch_norm(*got, eps=2e-5, relu=relu)
    yr = F.fixed_batch_normalization(*ref, eps=2e-5)
    yr = F.relu(yr) if relu else yr
    y.grad, yr.grad = gy.copy(), gy.copy()
    y.backward()
    yr.backward()
    np.testing.assert_allclose(y.array, yr.array, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("gx", "ggamma", "gbeta", "gmean", "gvar"), got, ref):
        np.testing.assert_allclose(g.grad, r.grad, rtol=2e-4, atol=2e-4, err_msg=name)


def test_fixed_batch_norm_gradient_check_float64():
    x, gamma, beta, gy = (a.astype(np.float64) for a in _inputs((2, 3, 4, 3), 13))
    rng = np.random.default_rng(14)
    mean, var = rng.standard_normal(3), rng.random(3) + 0.5
    gradient_check.check_backward(lambda *a: bn.fixed_batch_norm(*a, eps=1e-5, relu=False),
                                  (x, gamma, beta, mean, var), gy, dtype=np.float64, atol=1e-5, rtol=1e-5)


def test_batch_norm_propagates_nan():
    x, gamma, beta, _ = _inputs((2, 2, 3, 3), 15)
    x[0, 1, 0, 0] = np.nan
    y, mean, _ = bn.batch_norm(x, gamma, beta, 1e-5, True)
    assert np.isnan(mean[1]) and np.isnan(y.array[:, 1]).all() and np.isfinite(y.array[:, 0]).all()


def test_batch_norm_rejects_mismatched_gamma():
    x, gamma, beta, _ = _inputs((2, 3, 2, 2), 16)
    with pytest.raises(ValueError, match="gamma"):
        bn.batch_norm(x, gamma[:2], beta[:2])
