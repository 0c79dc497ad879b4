"""The scaled float16 wire: kernels, the large-N wire model against float64, and real MPI ranks.

Simulated jobs (hpcsgd.comm.fp16_model, the same kernels in the same order as the
hierarchical algorithm; tests/mpi/check_fp16_wire.py checks it bit for bit against real
ranks) use seeded synthetic gradients with ResNet-like magnitudes: each "layer" has its
own scale between 1e-6 and 1e-2, elements are normal around it. Bounds, for N up to 4096:

* 'chunk': relative L2 error < 1e-3 per layer, under 0.1% of the values zero where the
  float64 mean is not (only where partial sums cancel), and every element within the
  two-rounding bound (each node's partial sum and the sum, each <= 2^-11 relative);
* 'predivide' (the old scheme) exceeds both at N = 4096 on the same data: values
  divided by 4096 fall below float16's normal range (6.1e-5).
"""

import numpy as np
import pytest

from hpcsgd.comm import fp16_model
from hpcsgd.comm import fp16_reduce as F
from hpcsgd.comm import wire_kernels as K

LAYER_SCALES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def synthetic_grads(k: int, per_layer: int = 4096, seed: int = 0) -> tuple[list, list]:
    """``k`` per-rank flat gradients and the layer slices."""
    rng = np.random.default_rng(seed)
    slices, lo = [], 0
    for _ in LAYER_SCALES:
        slices.append(slice(lo, lo + per_layer))
        lo += per_layer
    common = np.concatenate([rng.standard_normal(per_layer) * s for s in LAYER_SCALES])
    grads = [(common + np.concatenate([rng.standard_normal(per_layer) * s for s in LAYER_SCALES]))
             .astype(np.float32) for _ in range(k)]
    return grads, slices


# -- kernels ------------------------------------------------------------------------------------


def test_half_exponent_puts_every_float32_magnitude_in_range():
    exps = np.arange(1, 255, dtype=np.uint32)  # every normal float32 binade
    mant = np.array([0, 1, 0x400000, 0x7FFFFF], np.uint32)
    m = ((exps[:, None] << 23) | mant[None, :]).reshape(-1).view(np.float32)
    for v in m:
        e = K.half_exponent(v)
        assert K.HALF_EXP_MIN <= e <= K.HALF_EXP_MAX
        scaled = np.float64(v) * 2.0 ** e
        if K.HALF_EXP_MIN < e < K.HALF_EXP_MAX:
            assert 2.0 ** 14 <= scaled < 2.0 ** 15, (v, e)
        else:
            assert scaled < 2.0 ** 15, (v, e)  # clamped: tiny maxima get less headroom, never overflow
    assert K.half_exponent(0.0) == K.half_exponent(np.inf) == K.half_exponent(np.nan) == 0
    assert K.half_exponent(1e-45) == K.HALF_EXP_MAX  # float32 subnormal maximum


def test_exponent_header_round_trip():
    for e in (-126, -1, 0, 1, 126):
        assert K.exponent_of(K.exponent_bits(e)) == e


def test_encode_decode_never_overflows_and_keeps_relative_precision():
    rng = np.random.default_rng(4)
    for top in (1e-30, 1e-8, 1.0, 6e4, 1e30, 3.4e38):
        x = (rng.standard_normal(5000) * top / 4).astype(np.float32)
        x[0] = np.float32(top)
        x[1] = x[0] * np.float32(2.0 ** -20)  # 20 binades below the maximum: still 11 bits
        slot = np.empty(x.size + 1, np.uint16)
        F.encode_chunk(F.ArraySource(x), 0, x.size, slot)
        out = F.ArraySource(np.empty_like(x))
        assert F.decode_chunk(out, 0, x.size, slot) == 0, top
        big = np.abs(x) >= np.abs(x).max() * 2.0 ** -29
        rel = np.abs(out.x[big].astype(np.float64) - x[big]) / np.abs(x[big])
        assert rel.max() <= 2.0 ** -11, (top, rel.max())
        assert out.x[1] != 0


def test_sum_scaled_rows_is_exact_scaling_plus_float32_sums():
    rng = np.random.default_rng(5)
    rows = np.empty((5, 101), np.uint16)
    ref = np.zeros(100, np.float32)
    for j, e in enumerate((-100, -3, 0, 7, 120)):
        vals = rng.standard_normal(100).astype(np.float16)
        rows[j, 0] = K.exponent_bits(e)
        rows[j, 1:] = vals.view(np.uint16)
        ref = ref + (vals.astype(np.float64) * 2.0 ** -e).astype(np.float32)  # exact product, f32 sum
    acc = np.empty(100, np.float32)
    m = K.sum_scaled_rows(rows, acc)
    assert (acc.view(np.uint32) == ref.view(np.uint32)).all()
    assert m == np.abs(ref).max()


def test_config_rejects_bad_values():
    from hpcsgd.errors import ConfigError

    with pytest.raises(ConfigError, match="half_scaling"):
        F.check_half_scaling("auto")
    with pytest.raises(ConfigError, match="wire_ranks"):
        F.check_wire_ranks(0)
    assert F.check_wire_ranks(None) is None and F.check_wire_ranks(4096) == 4096


# -- the wire at large simulated N ---------------------------------------------------------------


@pytest.mark.parametrize("n", [64, 1024, 4096])
def test_chunk_scheme_matches_float64_at_large_n(n):
    grads, slices = synthetic_grads(16)
    ref = fp16_model.reference(grads, n)
    got = fp16_model.simulate(grads, n, "chunk", bucket_elems=8192)
    for sl, scale in zip(slices, LAYER_SCALES):
        st = fp16_model.error_stats(got[sl], ref[sl])
        assert st["flushed"] < 1e-3 and st["nonfinite"] == 0, (n, scale, st)
        assert st["rel_l2"] < 1e-3, (n, scale, st)
    # per element: each node's partial sum rounded once (<= 2^-11 relative), the float32 sum
    # over M = n/8 nodes (<= M 2^-24 of the sum of |partials|), the result rounded once
    a = np.abs(np.array(grads, np.float64))
    partials = n / 8 * np.maximum(a[:8].sum(0), a[8:].sum(0)) / n  # >= sum of |node partials|
    tol = 2.0 ** -11 * (np.abs(ref) + partials) + (n / 8 + 2) * 2.0 ** -24 * partials
    assert (np.abs(got - ref) <= tol).all()


def test_predivide_scheme_fails_the_same_bounds_at_4096():
    grads, slices = synthetic_grads(16)
    ref = fp16_model.reference(grads, 4096)
    old = fp16_model.error_stats(*[a[slices[-1]] for a in
                                   (fp16_model.simulate(grads, 4096, "predivide", bucket_elems=8192), ref)])
    assert old["flushed"] > 0.01 and old["rel_l2"] > 1e-2, old


def test_no_overflow_at_4096_with_adversarial_gradients():
    grads, _ = synthetic_grads(8, per_layer=512)
    grads[3][10] = 3e38  # one rank near float32's maximum
    grads[5][:100] = 65504.0 * 4096
    ref = fp16_model.reference(grads, 4096)
    got = fp16_model.simulate(grads, 4096, "chunk", bucket_elems=1024)
    assert np.isfinite(got).all()
    assert np.allclose(got[:100], ref[:100], rtol=2 ** -10) and np.isclose(got[10], ref[10], rtol=2 ** -10)
    old = fp16_model.simulate(grads, 4096, "predivide", bucket_elems=1024)
    assert not np.isfinite(old[10])  # 3e38 / 4096 * 512 nodes overflows the old wire


def test_wire_model_validates_its_arguments():
    grads, _ = synthetic_grads(2, per_layer=8)
    with pytest.raises(ValueError, match="scheme"):
        fp16_model.simulate(grads, 8, "fp8")
    with pytest.raises(ValueError, match="multiple"):
        fp16_model.simulate(grads, 12, "chunk", ranks_per_node=8)


# -- real ranks ---------------------------------------------------------------------------------

CHECK = "tests/mpi/check_fp16_wire.py"


@pytest.mark.mpi
@pytest.mark.parametrize("n,per_node", [(1, None), (2, None), (2, "1"), (4, "2"), (4, "1"), (3, "2")])
def test_fp16_wire_on_mpi_ranks(mpirun, n, per_node):
    """Bit-identical on every rank, bit-equal to the wire model, within the float64 bound."""
    env = {"HPCSGD_RANKS_PER_NODE": per_node} if per_node else {}
    res = mpirun(CHECK, n, env=env, timeout=240)
    assert res.stdout.count("fp16 wire checks passed") == n, res.stdout
