"""Fused cast kernels vs NumPy: bit-exact float16 (incl. ties, subnormals, inf, nan), bfloat16, counts."""

import numpy as np
from gpu_skip import require_cuda
from numba import njit

from hpcsgd.comm import wire_convert as C
from hpcsgd.comm import wire_gpu as G
from hpcsgd.comm import wire_kernels as K


def tricky_f32() -> np.ndarray:
    """Every float16 value, the float32 midpoints to its neighbour (ties) and one ulp either side."""
    h = np.arange(0, 0x7C00, dtype=np.uint32).astype(np.uint16)  # finite non-negative float16
    lo = h.view(np.float16).astype(np.float32)
    hi = np.append(lo[1:], np.float32(65536.0))  # next float16 (65536 = overflow boundary)
    mid = ((lo.astype(np.float64) + hi.astype(np.float64)) / 2).astype(np.float32)  # exact in float32
    mb = mid.view(np.uint32)
    vals = np.concatenate([lo, mid, (mb + 1).view(np.float32), (mb - 1).view(np.float32),
                           np.array([np.inf, np.nan, 1e-45, 3e38, 65504, 65519.99, 65520, 2.0 ** -25,
                                     2.0 ** -26, 1e-8], np.float32)])
    rng = np.random.default_rng(0)
    rnd = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    vals = np.concatenate([vals, rnd])
    return np.concatenate([vals, -vals])


def f16_bits_equal(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Equal bits, or both NaN (hardware quiets signalling NaN payloads)."""
    nan = lambda b: ((b & 0x7C00) == 0x7C00) & ((b & 0x3FF) != 0)
    return (got == ref) | (nan(got) & nan(ref))


@njit
def _soft_pack(src, dst):
    for i in range(src.size):
        dst[i] = C.soft_f32_to_f16(src[i])


@njit
def _soft_unpack(src, dst):
    for i in range(src.size):
        dst[i] = C.soft_f16_to_f32(src[i])


def test_float16_pack_is_bit_exact_vs_numpy():
    x = tricky_f32()
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    out = np.empty(x.size, np.uint16)
    K.pack_into(x, out, 1.0, "float16")
    bad = ~f16_bits_equal(out, ref)
    assert not bad.any(), f"{bad.sum()} mismatches, first x={x[bad][:5]!r}"
    soft = np.empty(x.size, np.uint16)
    _soft_pack(x, soft)  # the fallback for CPUs/LLVM builds without half support
    bad = ~f16_bits_equal(soft, ref)
    assert not bad.any(), f"soft: {bad.sum()} mismatches, first x={x[bad][:5]!r}"


def test_float16_unpack_every_value_and_counts_nonfinite():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = h.view(np.float16).astype(np.float32)
    for impl in ("kernel", "soft"):
        out = np.empty(h.size, np.float32)
        if impl == "kernel":
            bad = K.unpack_from(h, out, 1.0, "float16")
            assert bad == int((~np.isfinite(ref)).sum()) == 2 * 1024  # +-inf and 2 x 1023 NaNs
        else:
            _soft_unpack(h, out)
        fin = np.isfinite(ref)
        assert (out[fin].view(np.uint32) == ref[fin].view(np.uint32)).all(), impl
        assert np.isnan(out[np.isnan(ref)]).all() and (out[np.isinf(ref)] == ref[np.isinf(ref)]).all(), impl


def test_scale_is_applied_before_the_cast():
    # 60000 * 4 ranks overflows float16 unless divided by the world size first
    x = np.full(1000, 240000.0, np.float32)
    out = np.empty(1000, np.uint16)
    K.pack_into(x, out, 0.25, "float16")
    assert (out.view(np.float16) == np.float16(60000)).all()
    back = np.empty(1000, np.float32)
    assert K.unpack_from(out, back, 1.0, "float16") == 0
    K.pack_into(x, out, 1.0, "float16")
    assert K.unpack_from(out, back, 1.0, "float16") == 1000  # overflow is counted


def test_bfloat16_round_trip_and_reference():
    x = tricky_f32()
    out = np.empty(x.size, np.uint16)
    K.pack_into(x, out, 1.0, "bfloat16")
    assert (out == C.bf16_bits_reference(x)).all()
    # ties round to even: 1 + 2^-8 (tie between 1 and 1+2^-7) -> 1
    t = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], np.float32)
    tb = np.empty(3, np.uint16)
    K.pack_into(t, tb, 1.0, "bfloat16")
    assert list(C.bf16_to_f32_reference(tb)) == [1.0, 1 + 2 ** -6, -1.0]
    back = np.empty(x.size, np.float32)
    bad = K.unpack_from(out, back, 1.0, "bfloat16")
    assert bad == int((~np.isfinite(back)).sum()) and bad >= 4  # +-inf, +-nan at least
    fin = np.isfinite(x) & (np.abs(x) < 3e38) & (np.abs(x) > 1.2e-38)  # float32 normals
    assert np.allclose(back[fin], x[fin], rtol=2 ** -8, atol=0)


def test_float32_pack_unpack_scale_and_count():
    x = np.arange(10, dtype=np.float32)
    x[3] = np.nan
    x[7] = -np.inf
    buf = np.empty(10, np.float32)
    K.pack_into(x, buf, 0.5, "float32")
    out = np.empty(10, np.float32)
    assert K.unpack_from(buf, out, 2.0, "float32") == 2
    np.testing.assert_array_equal(out, x)


def test_sum_rows_accumulates_in_float32():
    # 2048 + 1 + 1 in float16 pairwise would stay 2048 (ulp 2); float32 accumulation gives 2050
    rows = np.array([[2048.0], [1.0], [1.0]], np.float16).view(np.uint16)
    out = np.empty(1, np.uint16)
    assert K.sum_rows_to_wire(rows, out, "float16") == 0
    assert out.view(np.float16)[0] == 2050
    rows = np.array([[60000.0], [60000.0]], np.float16).view(np.uint16)
    assert K.sum_rows_to_wire(rows, out, "float16") == 1  # overflow counted


def test_reduce_shards_and_scaled_plus():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(100).astype(np.float32) for _ in range(4)]
    for k in (1, 2, 3, 4):
        out = np.empty(100, np.float32)
        assert K.reduce_shards(parts[:k], out, 0.25) == 0
        np.testing.assert_allclose(out, np.sum(parts[:k], 0) * 0.25, rtol=1e-6, atol=1e-7)
        K.scaled_plus(parts[0], 0.5, parts[1:k], out)
        np.testing.assert_allclose(out, parts[0] * 0.5 + np.sum(parts[1:k], 0), rtol=1e-6, atol=1e-6)


def test_non_float32_gradients_take_the_numpy_path():
    x = np.linspace(-3, 3, 50)  # float64
    buf = np.empty(50, np.uint16)
    K.pack_into(x, buf, 1.0, "float16")
    assert (buf == x.astype(np.float32).astype(np.float16).view(np.uint16)).all()
    back = np.empty(50, np.float16)
    assert K.unpack_from(buf, back, 1.0, "float16") == 0
    assert (back == x.astype(np.float16)).all()


def test_cupy_kernels_match_cpu():
    cupy = require_cuda()
    x = tricky_f32()
    x = x[np.isfinite(x)]
    for wire in ("float32", "float16", "bfloat16"):
        cpu = np.empty(x.size, K.wire_storage_dtype(wire))
        K.pack_into(x, cpu, 0.5, wire)
        gpu = G.cupy_pack_kernel(wire)(cupy.asarray(x), np.float32(0.5))
        assert (cupy.asnumpy(gpu).view(cpu.dtype) == cpu).all(), wire
        y, bad = G.cupy_unpack_kernel(wire)(gpu, np.float32(2.0))
        ref = np.empty(x.size, np.float32)
        nbad = K.unpack_from(cpu, ref, 2.0, wire)
        assert int(bad.sum()) == nbad and (cupy.asnumpy(y) == ref).all(), wire


def test_cupy_batched_pack_unpack_match_cpu():
    cupy = require_cuda()
    from types import SimpleNamespace

    from hpcsgd.comm.nccl import GpuBoundGrads, PieceTables
    from hpcsgd.comm.packing import GradLayout, Slot

    rng = np.random.default_rng(3)
    host = [rng.standard_normal(n).astype(np.float32) for n in (5, 1000, 33)]
    host[1][7] = np.inf
    layout = GradLayout([Slot(f"p{i}", (h.size,), "float32", int(sum(x.size for x in host[:i])), h.size)
                         for i, h in enumerate(host)])
    for wire in ("float32", "float16", "bfloat16"):
        dev = [cupy.asarray(h) for h in host]
        grads = SimpleNamespace(layout=layout, vectors=dev)
        g = GpuBoundGrads(grads, PieceTables(), cupy.zeros((), np.uint64))
        buf = cupy.empty(layout.total, {"float32": np.float32, "float16": np.float16}.get(wire, np.uint16))
        g.pack(3, layout.total - 2, buf[: layout.total - 5], 0.5, wire)
        cpu = np.empty(layout.total - 5, K.wire_storage_dtype(wire))
        K.pack_into(np.concatenate(host)[3:-2], cpu, 0.5, wire)
        assert (cupy.asnumpy(buf[: layout.total - 5]).view(cpu.dtype) == cpu).all(), wire
        g.unpack(3, layout.total - 2, buf[: layout.total - 5], 2.0, wire)  # counts into g.bad on the device
        assert int(g.bad) == 1, wire
