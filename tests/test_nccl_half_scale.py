"""The GPU path's scaled float16 arithmetic (hpcsgd/comm/half_scale.py) for N simulated ranks on CPU.

Each simulated rank is a thread running the code the GPU algorithm runs per rank
(``WireScales.begin_step``, ``nccl_mean_bucket``) on NumPy gradients with the CPU
pack/unpack kernels, against the stand-in NCCL of tests/nccl_standin.py (float16
partial sums rounded at every hop, ring or tree order). The reference is the float64
mean. tests/test_nccl_half_scale_algorithms.py runs the GPU algorithm classes
themselves the same way. Nothing here touches CUDA; what the CUDA kernels do is
checked by tests/test_gpu_half_scale.py on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from nccl_standin import SIZES, U, decade_gradients, mean_on_ranks, rel_l2, ring_sum16, tree_sum16

from hpcsgd.comm import half_scale, wire_kernels
from hpcsgd.comm.bucket_algorithm import raise_if_nonfinite
from hpcsgd.errors import ConfigError, GradientOverflowError

# -- the exponent ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 3, 8, 1000, 1024, 4096, 100_000])
def test_exponent_puts_world_times_max_in_the_binade_below_the_headroom(world):
    rng = np.random.default_rng(world)
    ms = np.concatenate([rng.lognormal(0, 20, 2000).astype(np.float32),
                         np.float32([1e-30, 1.0, 65504.0, 3e38, np.finfo(np.float32).max])])
    ms = ms[np.isfinite(ms) & (ms > 0)]
    for m in ms:
        e = half_scale.scale_exponent(int(m.view(np.uint32)), world)
        scaled = float(m) * world * 2.0 ** e  # exact in float64 up to world's bits
        assert 2.0 ** 13 <= scaled < 2.0 ** 14, (m, e)
        assert half_scale.pack_scale(e) == 2.0 ** e and half_scale.pack_scale(e).dtype == np.float32
        if float(m) * world < np.finfo(np.float32).max:  # the CPU path's function gives the same, less 1
            assert e == wire_kernels.half_exponent(np.float32(float(m) * world)) - half_scale.HEADROOM_BITS


def test_exponent_of_zero_and_non_finite_maxima_is_zero():
    for v in (0.0, np.inf, np.nan, -np.nan):
        bits = int(np.abs(np.float32(v)).view(np.uint32))
        assert half_scale.scale_exponent(bits, 1024) == 0


def test_maximum_bits_order_like_magnitudes_with_nan_above_inf():
    x = np.float32([0.5, -3.0, 1e-40, -0.0])
    assert half_scale.absmax_bits(x) == np.float32(3.0).view(np.uint32)
    assert half_scale.absmax_bits(np.append(x, -np.inf)) == 0x7F800000
    assert half_scale.absmax_bits(np.float32([np.inf, np.nan, 7.0])) > 0x7F800000
    assert half_scale.absmax_bits(np.float16([-2.0, 1.0])) == np.float32(2.0).view(np.uint32)
    with np.errstate(over="ignore"):
        assert half_scale.absmax_bits(np.float64([1e300])) == 0x7F800000  # beyond float32: inf


def test_half_scaling_is_validated_and_bfloat16_float32_are_never_scaled():
    assert half_scale.uses_scale(["float16"], "chunk")
    assert not half_scale.uses_scale(["float16"], "predivide")
    assert not half_scale.uses_scale(["float32", "bfloat16"], "chunk")
    with pytest.raises(ConfigError):
        half_scale.uses_scale(["float16"], "global")
    s = half_scale.WireScales([(0, 4)], 1000, scaled=False)
    assert s.factors(0) == (np.float32(1 / 1000), np.float32(1.0))


# -- exact construction: scaled sums are exact, pre-divided ones flush -----------------------------


@pytest.mark.parametrize("n_ranks", [1024, pytest.param(4096, marks=pytest.mark.slow)])
def test_scaled_mean_is_exact_where_predivide_flushes_small_gradients(n_ranks):
    """Gradients ``c * 2^-p``, ``c`` in {-1, 0, 1}, ``p`` from 10 to 34 (1e-3 down to 6e-11).

    With the scaled wire every packed value and every partial sum is an integer
    multiple of ``2^(e - p) >= 2^-24`` below 2048 of them, so float16 holds them
    exactly in any order and the mean must equal the float64 mean bit for bit.
    Pre-divided, ``c * 2^-p / N`` is at most half the smallest float16 subnormal
    (2^-25, a tie that rounds to 0) from ``p = 15`` (N = 1024) or 13 (N = 4096) on, so
    those means are lost; below that, pre-divided values are exact subnormals.
    """
    rng = np.random.default_rng(17)
    n = 512
    p = rng.integers(10, 35, n)
    c = rng.choice([-1, 0, 0, 0, 0, 0, 0, 1], size=(n_ranks, n)).astype(np.float64)
    p[0], c[0, 0] = 10, 1.0  # the largest magnitude: 2^-10
    assert np.abs(c).sum(axis=0).max() < 2048  # the exactness precondition, any order
    x = (c * 2.0 ** -p).astype(np.float32)
    ref = x.astype(np.float64).mean(axis=0)
    got, bad, exps, _ = mean_on_ranks(x, "chunk")
    np.testing.assert_array_equal(got, np.broadcast_to(ref.astype(np.float32), got.shape))
    assert bad == [0] * n_ranks and exps[0] == [23 - int(np.log2(n_ranks))] * 2  # N 2^-10 2^e = 2^13
    pre, _, _, _ = mean_on_ranks(x, "predivide")
    small = (p >= 25 - int(np.log2(n_ranks))) & (ref != 0)
    assert small.sum() > 200 and np.all(pre[:, small] == 0)  # every such mean lost
    assert np.array_equal(pre[0, ~small], ref[~small].astype(np.float32))  # the rest was exact too


# -- realistic gradients: noise spanning five decades, x0.01 ------------------------------------------


@pytest.mark.parametrize("n_ranks", [1024, pytest.param(4096, marks=pytest.mark.slow)])
def test_scaled_wire_keeps_small_gradients_that_predivide_loses(n_ranks):
    """Relative L2 error per decade against the float64 mean, both float16 schemes, ring sums.

    The float16 ring rounds each of the N-1 partial sums: with zero-mean noise the
    rounding errors add up to about ``2^-10 / sqrt(12) * sqrt(N)`` relative (6e-3 at
    1024, 1.3e-2 at 4096) whatever the scale, so the scaled wire must stay below 0.05
    in every decade. Pre-divided, the 1e-6 decade is ``< 2^-25`` after ``/ N``: lost.
    """
    x, d = decade_gradients(n_ranks, seed=n_ranks)
    ref = x.astype(np.float64).mean(axis=0)
    got, bad, exps, _ = mean_on_ranks(x, "chunk")
    pre, _, _, _ = mean_on_ranks(x, "predivide")
    assert bad == [0] * n_ranks
    assert all(e == exps[0] for e in exps) and np.all(got == got[0])  # the same bits on every rank
    errs = [rel_l2(got[0, d == k], ref[d == k]) for k in range(5)]
    assert max(errs) < 0.05, errs
    assert max(errs) < 2 * errs[0], errs  # small gradients fare like large ones
    assert np.mean(got[0, d == 4] == 0) < 0.01
    assert rel_l2(pre[0, d == 4], ref[d == 4]) > 0.9 and np.mean(pre[0, d == 4] == 0) > 0.9
    assert rel_l2(pre[0, d == 3], ref[d == 3]) > 3 * errs[3]


def test_tree_order_gives_the_same_accuracy():
    x, d = decade_gradients(1024, seed=5)
    ref = x.astype(np.float64).mean(axis=0)
    got, _, _, group = mean_on_ranks(x, "chunk", order="tree")
    assert group.log == [("uint32", "max"), ("float16", "sum"), ("float16", "sum")]  # one MAX per step
    assert max(rel_l2(got[0, d == k], ref[d == k]) for k in range(5)) < 0.05


def test_a_float16_ring_stalls_on_4096_equal_addends_whatever_the_scale():
    """A limit of NCCL's float16 sum that no scale lifts: a ring's partial sum stops growing
    once half its ulp exceeds the addend. 4096 ranks holding 0.01 pack 2.56 (``2^8 * 0.01``)
    scaled, or 0.01 / 4096 pre-divided: the sum sticks at 2^13 (ulp 8) or the same value
    2^-21 lower, so both means come out 0.0078125 instead of 0.01. A tree adds 12 levels."""
    n = 4096
    x = np.full((n, 8), 0.01, np.float32)
    e = half_scale.scale_exponent(int(np.float32(0.01).view(np.uint32)), n)
    scaled = (x * half_scale.pack_scale(e)).astype(np.float16)
    pre = (x * np.float32(1 / n)).astype(np.float16)
    assert e == 8
    for rows, factor in ((scaled, half_scale.unpack_scale(e, n)), (pre, np.float32(1))):
        np.testing.assert_array_equal(ring_sum16(rows).astype(np.float32) * factor, np.float32(2.0 ** -7))
        np.testing.assert_allclose(tree_sum16(rows).astype(np.float32) * factor, 0.01, rtol=13 * U)


# -- overflow and non-finite values ---------------------------------------------------------------


@pytest.mark.parametrize("order", ["ring", "tree"])
@pytest.mark.parametrize("n_ranks", [3, 1000])
def test_no_finite_gradient_overflows(n_ranks, order):
    """Same-sign maxima on every rank (the largest partial sums), and mixed signs and magnitudes
    within 2^12 of each other (a bucket's common scale keeps values down to about 2^-27 of its
    largest). Error bound of a float16 sum: ``(hops + 1) u`` of ``sum |x|``, ``u = 2^-11``."""
    rng = np.random.default_rng(n_ranks)
    x = np.empty((n_ranks, sum(SIZES)), np.float32)
    x[:, :300] = np.float32(1e38)  # the mean's float16 rounding cannot pass float32's largest value
    x[:, 300:] = rng.choice(np.float32([65504.0 * 4096, -1e9, 3e5, 7e4]), size=(n_ranks, 212))
    ref = x.astype(np.float64).mean(axis=0)
    got, bad, _, _ = mean_on_ranks(x, "chunk", order=order)
    assert bad == [0] * n_ranks and np.all(np.isfinite(got))
    rtol = 2 * U * (n_ranks if order == "ring" else np.log2(n_ranks) + 2)  # float16 sum bound
    np.testing.assert_allclose(got[0, :300], ref[:300], rtol=rtol)
    scale = np.abs(x[:, 300:]).astype(np.float64).mean(axis=0)
    assert np.all(np.abs(got[0, 300:] - ref[300:]) <= rtol * scale)


def test_a_non_finite_gradient_on_one_rank_is_counted_alike_on_every_rank():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, sum(SIZES))) * 0.01).astype(np.float32)
    x[3, 5], x[6, 400] = np.inf, np.nan  # one in each bucket
    got, bad, exps, _ = mean_on_ranks(x, "chunk")
    assert exps[0] == [0, 0]  # non-finite maxima: unscaled
    assert bad[0] >= 2 and bad == [bad[0]] * 8 and np.all(got == got[0], where=np.isfinite(got[0]))
    assert not np.isfinite(got[0, 5]) and np.isnan(got[0, 400])
    for b in bad:  # check_finite: every rank raises, so every rank skips the step
        with pytest.raises(GradientOverflowError):
            raise_if_nonfinite(b, True, "float16")
    x[6, 400] = 0.0
    got, bad, exps, _ = mean_on_ranks(x, "chunk")
    assert exps[0][1] != 0 and bad == [1] * 8 and np.isfinite(got[0, 300:]).all()
