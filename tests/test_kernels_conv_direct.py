"""hpcsgd.kernels.conv_direct against Chainer's convolution_2d and a float64 gradient check.

Every shape class the dispatch can send there (stride 1 or 2, few channels):
3x3 pad 1 on the small ResNets' 28x28 and 14x14 maps and on 7x7, 3x3/2 and
1x1/2 projections on even and odd maps, non-square maps, batch 1 and a batch
with a partial image block (NB + 1), no padding, 5x5 pad 2; forward, input,
weight and bias gradients, and the calls that need only one of the two (a
stem, a frozen layer). The dispatch limits
are lowered in the fixture so that small shapes reach the kernel.
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
    (4, 8, 28, 28, 8, 3, 1, 1),      # ResNet-8 stage 1
    (3, 16, 14, 14, 16, 3, 1, 1),    # ResNet-8 stage 2
    (2, 1, 28, 28, 8, 3, 1, 1),      # stem: one input channel
    (1, 5, 7, 7, 6, 3, 1, 1),        # batch 1, 7x7
    (conv_direct.NB + 1, 3, 5, 4, 2, 3, 1, 1),  # a full block and a block of one image
    (2, 4, 9, 13, 5, 3, 1, 1),       # non-square, odd
    (2, 2, 6, 7, 3, 3, 1, 0),        # no padding
    (2, 3, 8, 6, 4, 5, 1, 2),        # 5x5 pad 2
    (1, 2, 2, 3, 3, 5, 1, 2),        # kernel wider than the image (empty tap ranges)
    (3, 8, 28, 28, 16, 3, 2, 1),     # ResNet-8 stage 2 entry, 28 -> 14
    (2, 16, 14, 14, 32, 3, 2, 1),    # stage 3 entry, 14 -> 7
    (2, 8, 28, 28, 16, 1, 2, 0),     # 1x1/2 projection
    (conv_direct.NB + 1, 3, 7, 9, 4, 3, 2, 1),  # odd sizes at stride 2, partial block
    (1, 2, 7, 5, 3, 1, 2, 0),        # 1x1/2 on an odd, non-square map
    (2, 3, 8, 7, 2, 3, 2, 0),        # stride 2 without padding
    (2, 3, 9, 11, 5, 5, 2, 2),       # 5x5/2: weight-gradient tap groups of 3 across both phases
    (3, 2, 3, 3, 4, 3, 2, 1),        # stride 2 onto a 2x2 map (narrower than a register tile)
    (2, 6, 10, 10, 7, 3, 1, 1),      # 7 output channels: a partial register tile
]


@pytest.fixture(autouse=True)
def direct_everywhere(monkeypatch):
    monkeypatch.setattr(conv_direct, "DIRECT_MAX_CH", 64)
    monkeypatch.setattr(conv_direct, "DIRECT_MIN_CIN", 1)
    monkeypatch.setattr(conv_direct, "ALLOW_1X1", True)


def _run(fn, x, W, b, gy, need_x=True, need_W=True):
    xv = chainer.Variable(x.copy(), requires_grad=need_x)
    Wv = chainer.Variable(W.copy(), requires_grad=need_W)
    bv = None if b is None else chainer.Variable(b.copy())
    y = fn(xv, Wv, bv)
    y.grad = gy.copy()
    y.backward()
    return y.array, xv.grad, Wv.grad, None if b is None else bv.grad


def _data(shape, bias, dtype=np.float32, seed=0):
    n, c, h, w, co, k, s, p = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = rng.standard_normal((co, c, k, k)).astype(dtype)
    b = rng.standard_normal(co).astype(dtype) if bias else None
    gy = rng.standard_normal((n, co, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)).astype(dtype)
    return x, W, b, gy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
def test_direct_matches_chainer(shape, bias):
    s, p = shape[-2:]
    assert conv_direct.applies(shape[:4], (shape[4], shape[1], shape[5], shape[5]), (s, s), (p, p))
    x, W, b, gy = _data(shape, bias)
    got = _run(lambda x, W, b: conv.conv2d(x, W, b, s, p), x, W, b, gy)
    assert isinstance(got[0], np.ndarray)
    ref = _run(lambda x, W, b: F.convolution_2d(x, W, b, stride=s, pad=p), x, W, b, gy)
    for name, g, r in zip(("y", "gx", "gW", "gb"), got, ref):
        if r is None:
            continue
        assert g.shape == r.shape and g.dtype == np.float32, name
        # float32 sums of up to N*H*W (3136) products of N(0,1) values
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-3, err_msg=f"{name} differs for {shape}")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[9]], ids=["stride1", "stride2"])
@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["gx_only", "gW_only"])
def test_direct_one_gradient(shape, need):
    x, W, _, gy = _data(shape, False, seed=1)
    s, p = shape[-2:]
    got = _run(lambda x, W, b: conv.conv2d(x, W, b, s, p), x, W, None, gy, *need)
    ref = _run(lambda x, W, b: F.convolution_2d(x, W, b, stride=s, pad=p), x, W, None, gy, *need)
    for g, r, wanted in zip(got[1:3], ref[1:3], need):
        assert (g is None) == (not wanted)
        if wanted:
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 4, 3, 1, 1), (1, 2, 4, 4, 3, 3, 1, 0),
                                   (3, 2, 5, 4, 2, 5, 1, 2), (2, 3, 7, 6, 4, 3, 2, 1),
                                   (2, 2, 5, 7, 3, 1, 2, 0), (2, 2, 7, 8, 5, 5, 2, 2),
                                   (2, 1, 6, 6, 3, 3, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_direct_gradient_check_float64(shape):
    x, W, b, gy = _data(shape, True, dtype=np.float64, seed=2)
    s, p = shape[-2:]
    gradient_check.check_backward(lambda x, W, b: conv.conv2d(x, W, b, s, p), (x, W, b), gy,
                                  dtype=np.float64, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[9], SHAPES[3], SHAPES[15]],
                         ids=lambda s: "x".join(map(str, s)))
def test_direct_weight_gradient_row_chunks(monkeypatch, shape):
    """The weight gradient reduces its register tile every ``ROW_POSITIONS // wo`` output rows;
    chunks of 1-3 rows put chunk edges on the rows whose taps fall into the padding."""
    s, p = shape[-2:]
    x, W, b, gy = _data(shape, False, seed=4)
    ref = _run(lambda x, W, b: F.convolution_2d(x, W, b, stride=s, pad=p), x, W, None, gy)
    wo = gy.shape[3]
    for rows in (1, 2, 3):
        monkeypatch.setattr(conv_direct, "ROW_POSITIONS", rows * wo)
        got = _run(lambda x, W, b: conv.conv2d(x, W, b, s, p), x, W, None, gy)
        # float32 sums of up to N*H*W products of N(0,1) values, as above
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-4, atol=2e-3, err_msg=f"rows={rows}")


def test_dispatch_limits(monkeypatch):
    monkeypatch.setattr(conv_direct, "DIRECT_MAX_CH", 32)
    monkeypatch.setattr(conv_direct, "DIRECT_MIN_CIN", 2)
    monkeypatch.setattr(conv_direct, "ALLOW_1X1", False)
    ok = conv_direct.applies
    assert ok((8, 8, 28, 28), (8, 8, 3, 3), (1, 1), (1, 1))
    assert ok((8, 8, 28, 28), (16, 8, 3, 3), (2, 2), (1, 1))         # stride 2
    assert ok((8, 32, 7, 7), (32, 32, 3, 3), (1, 1), (1, 1))
    assert not ok((8, 32, 7, 7), (64, 32, 3, 3), (1, 1), (1, 1))     # too many channels
    assert not ok((8, 1, 28, 28), (8, 1, 3, 3), (1, 1), (1, 1))      # one input channel
    assert not ok((8, 8, 28, 28), (16, 8, 1, 1), (2, 2), (0, 0))     # 1x1
    assert not ok((8, 8, 28, 28), (16, 8, 3, 3), (3, 3), (1, 1))     # stride 3
    assert not ok((8, 8, 28, 28), (16, 8, 3, 3), (1, 2), (1, 1))     # unequal strides
    monkeypatch.setattr(conv_direct, "DIRECT_MAX_CH", 0)
    assert not ok((8, 8, 28, 28), (8, 8, 3, 3), (1, 1), (1, 1))      # switched off


def test_resnet8_same_loss_and_grads_with_and_without_kernels():
    """The main job's model end to end; the fixture routes all its convolutions to the direct path."""
    import hpcsgd.kernels
    from hpcsgd.models import build_model, ops

    saved = dict(ops.CPU_IMPL)
    try:
        np.random.seed(0)
        model = build_model("resnet_small", 10, in_channels=1, depth=8, width=8)
        rng = np.random.default_rng(3)
        x = rng.standard_normal((5, 1, 28, 28)).astype(np.float32)
        t = rng.integers(0, 10, 5).astype(np.int32)
        results = []
        for on in (False, True):
            hpcsgd.kernels.enable(on)
            model.cleargrads()
            with chainer.using_config("train", True):
                loss = F.softmax_cross_entropy(model(x), t)
            loss.backward()
            results.append((float(loss.array), {n: p.grad.copy() for n, p in model.namedparams()}))
    finally:
        ops.CPU_IMPL.clear()
        ops.CPU_IMPL.update(saved)
    (ref_loss, ref), (loss, got) = results
    assert abs(loss - ref_loss) < 1e-5
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-3, atol=1e-4, err_msg=name)


def test_the_other_vector_class_tiles_match_chainer():
    """Both register-tile sets are correct on any CPU: this file again, under the class not picked here.

    The tiles are compile-time constants, so the other set runs in a subprocess with
    ``HPCSGD_CONV_DIRECT_TILES`` (uncached: a forced set never meets a disk cache).
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    if os.environ.get("HPCSGD_CONV_DIRECT_TILES"):
        pytest.skip("already the forced run")
    other = "avx2" if conv_direct.VECTOR_CLASS == "avx512" else "avx512"
    env = dict(os.environ, HPCSGD_CONV_DIRECT_TILES=other)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not resnet8 and not other_vector_class"],
                         env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout, res.stdout[-2000:]


def test_vector_class_follows_the_cpu_numba_compiles_for(monkeypatch):
    """The host's class agrees with /proc/cpuinfo; a named numba target's features decide instead."""
    from hpcsgd.blas import read_cpu_flags
    from hpcsgd.kernels._numba import host_vector_class

    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    flags = read_cpu_flags()
    if flags:
        assert host_vector_class() == ("avx512" if "avx512f" in flags else "avx2")
    monkeypatch.setenv("NUMBA_CPU_NAME", "skylake-avx512")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma,+avx512f")
    assert host_vector_class() == "avx512"
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma")
    assert host_vector_class() == "avx2"


def test_row_groups_cover_every_tap_once():
    """Grouping a tap table keeps every (weight, column) term: groups expand back to the table."""
    from hpcsgd.kernels import conv_taps

    nb = 4
    for args in [(9, 7, 3, 3, 1, 1, 1), (8, 6, 5, 5, 1, 2, 2), (7, 9, 3, 3, 2, 1, 1), (6, 7, 3, 3, 1, 0, 0)]:
        h, w, kh, kw, s, ph, pw = args
        flat = conv_taps.plan(h, w, kh, kw, s, ph, pw, nb, 3, 3, False)
        grouped = conv_taps.plan(h, w, kh, kw, s, ph, pw, nb, 3, 3, True)
        for (_, _, taps, counts), (g3, gc, rest, rc) in ((flat.fwd, grouped.fwd), (flat.bwd, grouped.bwd)):
            for r, p in np.ndindex(counts.shape):
                want = sorted(tuple(taps[r, p, t]) for t in range(counts[r, p]))
                got = [tuple(rest[r, p, t]) for t in range(rc[r, p])]
                for ka, kb, kc, off in (g3[r, p, g] for g in range(gc[r, p])):
                    got += [(ka, off), (kb, off + nb), (kc, off + 2 * nb)]
                assert sorted(got) == want, (args, r, p)
        if s == 1:  # stride 1, 3 or more taps per kernel row: every full run becomes a group
            assert grouped.fwd[1].sum() > 0 and grouped.bwd[1].sum() > 0
