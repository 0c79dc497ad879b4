"""Channel-major activations (hpcsgd.kernels.layout) through conv, batch norm and the residual join.

The reference for every kernel is the same kernel on the same values in NCHW memory (bitwise:
each element and each per-channel sum sees its operands in the same order) and Chainer's
functions; a small-map bottleneck block is checked end to end against Chainer in float64.
"""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest

from hpcsgd.kernels import batchnorm, conv, eltwise, layout


def _cm(a: np.ndarray) -> np.ndarray:
    """The values of NCHW ``a`` in channel-major memory."""
    return layout.nchw_view(np.ascontiguousarray(a.transpose(1, 0, 2, 3)))


def test_layout_helpers_recognise_each_memory_order():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 2, 5)).astype(np.float32)
    c = _cm(a)
    assert layout.channel_major(a) is None and layout.channel_major(c).shape == (4, 3, 2, 5)
    np.testing.assert_array_equal(c, a)
    assert layout.dense(c) is c and layout.dense(a) is a
    strided = a[:, ::2]
    assert layout.dense(strided).flags.c_contiguous
    # like(): a view when the order already matches, else one copy into the reference's order
    assert layout.like(c, c) is c
    moved = layout.like(c, a)
    assert layout.channel_major(moved) is not None and np.array_equal(moved, a)
    # rows(): (N*C, P) rows in memory order and the row of (n, c)
    r, cm = layout.rows(c)
    assert cm and r.base is not None
    for n, ch in [(0, 0), (2, 1), (1, 3)]:
        np.testing.assert_array_equal(r[layout.row_index(n, ch, 3, 4, cm)], a[n, ch].ravel())
    r, cm = layout.rows(a)
    assert not cm and np.array_equal(r[layout.row_index(2, 1, 3, 4, cm)], a[2, 1].ravel())
    # one image or one channel: both orders are the same memory, treated as NCHW
    assert layout.channel_major(_cm(a[:1])) is None and layout.channel_major(_cm(a[:, :1])) is None
    assert np.shares_memory(layout.flat(c), c) and np.array_equal(np.sort(layout.flat(c)), np.sort(a.ravel()))


@pytest.mark.parametrize("ksize,stride,pad,direct", [(3, 1, 1, False), (3, 2, 1, False), (1, 1, 0, True),
                                                     (1, 2, 0, False)])
def test_batched_conv_hands_on_channel_major_and_takes_either_order(ksize, stride, pad, direct):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 40, 6, 6)).astype(np.float32)
    W = rng.standard_normal((48, 40, ksize, ksize)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    ref = F.convolution_2d(x, W, b, stride=stride, pad=pad)
    gy = rng.standard_normal(ref.shape).astype(np.float32)
    out = {}
    for name, xin, gin in [("nchw", x, gy), ("cm", _cm(x), _cm(gy)), ("mixed", _cm(x), gy)]:
        xv, Wv, bv = chainer.Variable(xin), chainer.Variable(W.copy()), chainer.Variable(b.copy())
        y = conv.conv2d(xv, Wv, bv, stride, pad)
        assert layout.channel_major(y.array) is not None  # the GEMM's own memory order, no swap
        y.grad = gin
        y.backward()
        assert layout.channel_major(xv.grad) is not None  # the input gradient too
        out[name] = (y.array, xv.grad, Wv.grad, bv.grad)
    for name in ("cm", "mixed"):
        for got, want in zip(out[name], out["nchw"]):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(out["nchw"][0], ref.array, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_in_channel_major_memory_is_bitwise_the_nchw_result(relu):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 6, 3, 4)).astype(np.float32) * 3 + 1
    gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    res = {}
    for name, xin, gin in [("nchw", x, gy), ("cm", _cm(x), _cm(gy)), ("mixed", _cm(x), gy)]:
        xv, gv, bv = chainer.Variable(xin), chainer.Variable(gamma.copy()), chainer.Variable(beta.copy())
        y, mean, var = batchnorm.batch_norm(xv, gv, bv, relu=relu)
        assert (layout.channel_major(y.array) is not None) == (name != "nchw")
        y.grad = gin
        y.backward()
        res[name] = (y.array, xv.grad, gv.grad, bv.grad, mean, var)
        mean64, var64 = x.mean(axis=(0, 2, 3), dtype=np.float64), x.var(axis=(0, 2, 3), dtype=np.float64)
        np.testing.assert_allclose(mean, mean64, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, var64, rtol=1e-5)
        fy = batchnorm.fixed_batch_norm(xin, gamma, beta, mean64.astype(np.float32),
                                        var64.astype(np.float32), relu=relu)
        res[name] += (fy.array,)
    for name in ("cm", "mixed"):
        for got, want in zip(res[name], res["nchw"]):
            np.testing.assert_array_equal(got, want)


def test_residual_join_and_relu_keep_the_first_operand_order():
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((4, 5, 3, 3)).astype(np.float32) for _ in range(2))
    g1, g2 = (rng.standard_normal(a.shape).astype(np.float32) for _ in range(2))
    want = F.relu(a + b).array
    for ain, bin_ in [(_cm(a), _cm(b)), (_cm(a), b), (a, _cm(b))]:
        av, bv = chainer.Variable(ain), chainer.Variable(bin_)
        y1, y2 = eltwise.add_relu(av, bv, fork=True)
        assert (layout.channel_major(y1.array) is not None) == (layout.channel_major(ain) is not None)
        np.testing.assert_array_equal(y1.array, want)
        (ga, gb) = chainer.grad([y1, y2], [av, bv], grad_outputs=[chainer.Variable(_cm(g1)),
                                                                  chainer.Variable(g2)])
        np.testing.assert_array_equal(ga.array, (g1 + g2) * (want > 0))
        np.testing.assert_array_equal(gb.array, (g1 + g2) * (want > 0))
        xv = chainer.Variable(ain)
        r = eltwise.relu(xv)
        r.grad = g1
        r.backward()
        np.testing.assert_array_equal(r.array, np.maximum(a, 0))
        np.testing.assert_array_equal(xv.grad, g1 * (a > 0))


def test_small_map_bottleneck_block_matches_chainer_in_float64():
    """conv 1x1 -> BN+ReLU -> conv 3x3/2 -> BN+ReLU -> conv 1x1 -> BN, projection, join: every
    activation between the convolutions stays channel-major, values and gradients are Chainer's."""
    rng = np.random.default_rng(4)
    # 64 channels and more: the GEMM path (fewer take the direct and cache-blocked kernels, NCHW)
    x = rng.standard_normal((3, 64, 8, 8))
    shapes = [(64, 64, 1, 1), (64, 64, 3, 3), (128, 64, 1, 1), (128, 64, 1, 1)]
    Ws = [rng.standard_normal(s) / np.sqrt(np.prod(s[1:])) for s in shapes]
    gammas = [rng.standard_normal(c) * 0.5 + 1 for c in (64, 64, 128, 128)]
    betas = [rng.standard_normal(c) * 0.1 for c in (64, 64, 128, 128)]
    t = rng.integers(0, 128, 3).astype(np.int32)

    def block(conv2d, bn, add_relu, params, seen):
        xv, Wv, gv, bv = params
        h = x_in = xv
        for i, (stride, pad, relu) in enumerate([(1, 0, True), (2, 1, True), (1, 0, False)]):
            h = bn(conv2d(h, Wv[i], None, stride, pad), gv[i], bv[i], relu)
            seen.append(h.array)
        s = bn(conv2d(x_in, Wv[3], None, 2, 0), gv[3], bv[3], False)
        y = add_relu(h, s)
        seen.append(y.array)
        return F.softmax_cross_entropy(F.mean(y, axis=(2, 3)), t)

    def ours_bn(h, g, b, relu):
        return batchnorm.batch_norm(h, g, b, eps=2e-5, relu=relu)[0]

    def chainer_bn(h, g, b, relu):
        y = F.batch_normalization(h, g, b, eps=2e-5)
        return F.relu(y) if relu else y

    def chainer_conv(h, W, b, stride, pad):
        return F.convolution_2d(h, W, b, stride=stride, pad=pad)

    grads = []
    impls = [(conv.conv2d, ours_bn, eltwise.add_relu), (chainer_conv, chainer_bn, lambda a, b: F.relu(a + b))]
    for impl in impls:
        params = (chainer.Variable(x.copy()), [chainer.Variable(w.copy()) for w in Ws],
                  [chainer.Variable(g.copy()) for g in gammas], [chainer.Variable(b.copy()) for b in betas])
        seen = []
        loss = block(*impl, params, seen)
        loss.backward()
        if impl[0] is conv.conv2d:
            assert all(layout.channel_major(a) is not None for a in seen)
        grads.append([loss.array, params[0].grad] + [v.grad for group in params[1:] for v in group])
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ksize,pad", [(3, 1), (3, 0), (5, 2), (2, 0), (3, 2)])
@pytest.mark.parametrize("gather", [True, False])
def test_stride1_input_gradient_as_a_convolution_matches_chainer(monkeypatch, ksize, pad, gather):
    """The gather form (a convolution of gy with the flipped kernel) and col2im give Chainer's gx."""
    calls = []
    original = conv.Conv2D._input_gradient_as_convolution

    def spy(self, gyt, W):
        calls.append(W.shape)
        return original(self, gyt, W)

    monkeypatch.setattr(conv.Conv2D, "_input_gradient_as_convolution", spy)
    monkeypatch.setattr(conv, "GATHER_MIN_RATIO", 0 if gather else 10**9)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 36, 7, 6))
    W = rng.standard_normal((40, 36, ksize, ksize))
    ref_x, ref_W = chainer.Variable(x.copy()), chainer.Variable(W.copy())
    ref = F.convolution_2d(ref_x, ref_W, pad=pad)
    gy = rng.standard_normal(ref.shape)
    ref.grad = gy
    ref.backward()
    xv, Wv = chainer.Variable(x.copy()), chainer.Variable(W.copy())
    y = conv.conv2d(xv, Wv, None, 1, pad)
    y.grad = gy.copy()
    y.backward()
    assert len(calls) == (1 if gather else 0)
    np.testing.assert_allclose(y.array, ref.array, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(xv.grad, ref_x.grad, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(Wv.grad, ref_W.grad, rtol=1e-10, atol=1e-10)
    assert layout.channel_major(xv.grad) is not None
