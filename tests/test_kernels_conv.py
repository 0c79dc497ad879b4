"""hpcsgd.kernels.conv against Chainer's convolution_2d and a float64 gradient check.

Shapes: every kind of convolution ResNet-50 and the small ResNets use (7x7/2
pad 3 stem, 3x3/1 and 3x3/2 pad 1, 1x1/1, 1x1/2 projections), on odd sizes and
batch 1, with few channels; every GEMM path forced: per-image, per-image
cache-blocked (small Cout, one image per block), batched and batched cache-blocked.
"""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from hpcsgd.kernels import conv, conv_direct

# (N, Cin, H, W, Cout, k, stride, pad)
SHAPES = [
    (2, 3, 15, 13, 4, 7, 2, 3),   # ResNet stem on an odd image
    (1, 5, 7, 7, 6, 3, 1, 1),     # batch 1, 3x3/1
    (2, 4, 9, 8, 5, 3, 2, 1),     # 3x3/2 on odd height (v1.5 bottleneck / basic block)
    (3, 6, 5, 5, 7, 1, 1, 0),     # 1x1/1: direct GEMM
    (2, 6, 9, 7, 7, 1, 2, 0),     # 1x1/2 projection shortcut on odd sizes
    (1, 4, 1, 1, 3, 1, 1, 0),     # 1x1 on a 1x1 map (last stage at tiny inputs)
    (2, 3, 2, 2, 4, 3, 1, 1),     # 3x3 on 2x2 (last stage of ResNet-50 at 64 px)
    (2, 2, 6, 6, 3, 3, 1, 0),     # no padding
    (1, 2, 2, 3, 3, 7, 1, 3),     # padding wider than the image (empty row ranges)
]


@pytest.fixture(params=["per_image", "blocked", "batched", "blocked_batched"])
def layout(request, monkeypatch):
    monkeypatch.setattr(conv, "BATCHED_BELOW", 10**9 if "batched" in request.param else 0)
    monkeypatch.setattr(conv, "SMALL_COUT", 10**6 if "blocked" in request.param else 0)
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)  # blocked: one image per block
    monkeypatch.setattr(conv_direct, "DIRECT_MAX_CH", 0)  # GEMM paths only (direct: test_kernels_conv_direct)
    return request.param


def _run(fn, x, W, b, gy):
    xv, Wv = chainer.Variable(x.copy()), chainer.Variable(W.copy())
    bv = None if b is None else chainer.Variable(b.copy())
    y = fn(xv, Wv, bv)
    y.grad = gy.copy()
    y.backward()
    return y.array, xv.grad, Wv.grad, None if b is None else bv.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
def test_conv_matches_chainer(shape, bias, layout):
    n, c, h, w, co, k, s, p = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    W = rng.standard_normal((co, c, k, k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32) if bias else None
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    gy = rng.standard_normal((n, co, ho, wo)).astype(np.float32)
    got = _run(lambda x, W, b: conv.conv2d(x, W, b, s, p), x, W, b, gy)
    ref = _run(lambda x, W, b: F.convolution_2d(x, W, b, stride=s, pad=p), x, W, b, gy)
    for name, g, r in zip(("y", "gx", "gW", "gb"), got, ref):
        if r is None:
            continue
        assert g.shape == r.shape and g.dtype == np.float32, name
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=f"{name} differs for {shape}")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4], (2, 3, 4, 5, 2, 1, 1, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_conv_gradient_check_float64(shape, layout):
    n, c, h, w, co, k, s, p = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, h, w))
    W = rng.standard_normal((co, c, k, k))
    b = rng.standard_normal(co)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    gy = rng.standard_normal((n, co, ho, wo))
    gradient_check.check_backward(lambda x, W, b: conv.conv2d(x, W, b, s, p), (x, W, b), gy,
                                  dtype=np.float64, atol=1e-6, rtol=1e-6)


def test_conv_against_float64_loops():
    """Independent reference: the convolution sum written out in float64."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    W = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = conv.conv2d(x, W, None, 2, 1).array
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros(y.shape)
    for oy in range(y.shape[2]):
        for ox in range(y.shape[3]):
            patch = xp[:, :, 2 * oy:2 * oy + 3, 2 * ox:2 * ox + 3]
            ref[:, :, oy, ox] = np.einsum("ncij,ocij->no", patch, W.astype(np.float64))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_only_requested_gradients_are_computed():
    """The stem's input needs no gradient: backward must not fail or produce one."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 11, 11)).astype(np.float32)
    W = chainer.Variable(rng.standard_normal((2, 3, 7, 7)).astype(np.float32))
    y = conv.conv2d(x, W, None, 2, 3)
    y.grad = np.ones_like(y.array)
    y.backward()
    assert W.grad is not None and np.isfinite(W.grad).all()


@pytest.mark.parametrize("bad", ["channels", "too_small"])
def test_conv_rejects_bad_shapes(bad):
    x = np.zeros((1, 3, 4, 4), np.float32)
    W = np.zeros((2, 5 if bad == "channels" else 3, 7, 7), np.float32)
    with pytest.raises(ValueError, match="conv2d"):
        conv.conv2d(x, W, None, 1, 0)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("chunk_images", [1, 2, 5, 7])
def test_blocked_path_splits_batches_exactly(chunk_images, batched, monkeypatch):
    """Blocks of 1, 2 (with a remainder of 1), 5 (all) and more images than the batch."""
    monkeypatch.setattr(conv, "BATCHED_BELOW", 10**9 if batched else 0)
    monkeypatch.setattr(conv, "SMALL_COUT", 8)
    n, c, h, w, co = 5, 3, 6, 7, 8
    monkeypatch.setattr(conv, "CHUNK_BYTES", chunk_images * c * 9 * h * w * 4)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    W = rng.standard_normal((co, c, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((n, co, h, w)).astype(np.float32)
    node = conv.Conv2D(1, 1)
    xv, Wv = chainer.Variable(x.copy()), chainer.Variable(W.copy())
    y = node.apply((xv, Wv))[0]
    assert node.blocked and node.col is None  # nothing kept but x
    y.grad = gy.copy()
    y.backward()
    ref = _run(lambda x, W, b: F.convolution_2d(x, W, b, stride=1, pad=1), x, W, None, gy)
    for name, g, r in zip(("y", "gx", "gW"), (y.array, xv.grad, Wv.grad), ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=name)


def test_blocked_path_scope(monkeypatch):
    """Small Cout and a kernel larger than 1x1 only: ResNet-50's 64+ channels keep the old path."""
    monkeypatch.setattr(conv, "SMALL_COUT", 32)
    x = np.zeros((2, 4, 6, 6), np.float32)
    for cout, k, s, p, blocked in [(8, 3, 1, 1, True), (32, 3, 2, 1, True), (33, 3, 1, 1, False),
                                   (64, 3, 1, 1, False), (8, 1, 2, 0, False), (8, 1, 1, 0, False)]:
        node = conv.Conv2D(s, p)
        node.apply((x, np.zeros((cout, 4, k, k), np.float32)))
        assert node.blocked is blocked, (cout, k, s)
