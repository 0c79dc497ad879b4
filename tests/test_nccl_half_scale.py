"""The GPU path's scaled float16 arithmetic (hpcsgd/comm/half_scale.py) for N simulated ranks on CPU.

Each simulated rank is a thread running the code the GPU algorithm runs per rank
(``WireScales.begin_step``, ``nccl_mean_bucket``) on NumPy gradients with the CPU
pack/unpack kernels, against a stand-in NCCL communicator: ``allReduce`` MAX on
``uint32`` bit patterns and SUM of float16 that, like NCCL, stores every partial
sum in float16, one correctly rounded addition per hop, in ring order (the chunk of
an element starts after its owner and goes once round) or as a binary tree. The
reference is the float64 mean. The last tests run ``NcclAllreduceAlgorithm`` and
``GpuHierarchicalAlgorithm`` themselves, with NumPy standing in for CuPy (and NumPy
casts for the two CuPy cast kernels of the inter-node stage), the stand-in also
providing ``reduceScatter``/``allGather``. Nothing here touches CUDA; what the CUDA
kernels do is checked by tests/test_gpu_half_scale.py on a GPU.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from hpcsgd.comm import half_scale, wire_kernels
from hpcsgd.comm.bucket_algorithm import raise_if_nonfinite
from hpcsgd.comm.packing import BoundGrads, GradLayout, Slot
from hpcsgd.errors import ConfigError, GradientOverflowError

NCCL = types.SimpleNamespace(NCCL_SUM="sum", NCCL_MAX="max", NCCL_UINT32="uint32", NCCL_FLOAT16="float16",
                       NCCL_FLOAT32="float32")
U = 2.0 ** -11  # float16 unit roundoff


# -- a stand-in NCCL: N ranks as threads, collectives through one barrier ----------------------------


def ring_sum(rows: np.ndarray, dtype=np.float16) -> np.ndarray:
    """Sum over axis 0 in NCCL's ring order, rounding every partial sum to ``dtype``."""
    n_ranks, n = rows.shape
    cols = np.arange(n)
    start = (cols * n_ranks // max(n, 1) + 1) % n_ranks  # element j's chunk starts after its owner
    r64 = rows.astype(np.float64)
    acc = r64[start, cols]
    for hop in range(1, n_ranks):  # float16 + float16 is exact in float64: one rounding per hop
        acc = (acc + r64[(start + hop) % n_ranks, cols]).astype(dtype).astype(np.float64)
    return acc.astype(dtype)


def ring_sum16(rows: np.ndarray) -> np.ndarray:
    return ring_sum(rows, np.float16)


def tree_sum16(rows: np.ndarray) -> np.ndarray:
    """float16 sum over axis 0 as a binary tree (pairs of ranks, then pairs of pairs)."""
    level = rows.astype(np.float16)
    while level.shape[0] > 1:
        odd = level[-1:] if level.shape[0] % 2 else level[:0]
        even = level[0:-1:2] if odd.size else level[0::2]
        pairs = even.astype(np.float64) + level[1::2].astype(np.float64)
        level = np.concatenate([pairs.astype(np.float16), odd])
    return level[0]


class StandInNccl:
    """What hpcsgd calls on a ``cupy.cuda.nccl.NcclCommunicator``, on NumPy arrays instead of pointers."""

    def __init__(self, group: NcclGroup, rank: int):
        self.group, self.rank = group, rank

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 (CuPy's names)
        assert send is recv and count == send.size and stream == 0
        self.group.collect(self.rank, ("allReduce", dtype, op, count), send, recv)

    def reduceScatter(self, send, recv, count, dtype, op, stream):  # noqa: N802
        assert count == recv.size and send.size == count * self.group.n and stream == 0
        self.group.collect(self.rank, ("reduceScatter", dtype, op, count), send, recv)

    def allGather(self, send, recv, count, dtype, stream):  # noqa: N802
        assert count == send.size and recv.size == count * self.group.n and stream == 0
        self.group.collect(self.rank, ("allGather", dtype, None, count), send, recv)


def _typed(b: np.ndarray, dtype: str) -> np.ndarray:
    return b.view(np.float16) if dtype == "float16" else b


class NcclGroup:
    """The ranks of one stand-in communicator: a call completes when every rank has made it."""

    def __init__(self, n_ranks: int, order: str = "ring"):
        self.n, self.order = n_ranks, order
        self.calls: list = [None] * n_ranks
        self.barrier = threading.Barrier(n_ranks, action=self._reduce, timeout=300)
        self.log: list[tuple] = []

    def collect(self, rank: int, kind: tuple, send, recv) -> None:
        self.calls[rank] = (kind, send, recv)
        self.barrier.wait()

    def _sum(self, rows: np.ndarray, dtype: str, op: str) -> np.ndarray:
        if (dtype, op) == ("uint32", "max"):
            return rows.max(axis=0)
        assert op == "sum" and dtype in ("float16", "float32"), (dtype, op)
        if dtype == "float16" and self.order == "tree":
            return tree_sum16(rows)
        return ring_sum(rows, np.dtype(dtype).type)

    def _reduce(self) -> None:
        kinds = {k for k, _, _ in self.calls}
        assert len(kinds) == 1, f"ranks disagree on the collective: {kinds}"
        (name, dtype, op, count), = kinds
        self.log.append((dtype, op) if name == "allReduce" else (name, dtype))
        rows = np.stack([_typed(send, dtype) for _, send, _ in self.calls])  # a copy: recv may alias send
        out = rows.reshape(-1) if name == "allGather" else self._sum(rows, dtype, op)
        for r, (_, _, recv) in enumerate(self.calls):
            _typed(recv, dtype)[...] = out[r * count:(r + 1) * count] if name == "reduceScatter" else out


def run_ranks(n_ranks: int, fn, order: str = "ring"):
    """``[fn(rank, comm) for each rank]``, every rank on its own thread, collectives matched."""
    group = NcclGroup(n_ranks, order)
    out, errors = [None] * n_ranks, []

    def body(r):
        try:
            out[r] = fn(r, StandInNccl(group, r))
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)
            group.barrier.abort()

    old = threading.stack_size(1 << 20)
    try:
        threads = [threading.Thread(target=body, args=(r,)) for r in range(n_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        threading.stack_size(old)
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return out, group


# -- one rank's step, as NcclAllreduceAlgorithm runs it ------------------------------------------------

SIZES = (300, 212)  # two parameters; 600-byte buckets cut the first one off at 300 elements


def layout_of(sizes=SIZES) -> GradLayout:
    offs = np.cumsum((0, *sizes))
    return GradLayout([Slot(f"p{k}", (n,), "float32", int(offs[k]), n) for k, n in enumerate(sizes)])


def mean_on_ranks(x: np.ndarray, half_scaling: str, order: str = "ring", bucket_bytes: int = 600):
    """Per-rank float16 NCCL means of ``x`` (ranks x elements, float32). Returns
    ``(means, non-finite counts, exponents, group)``, one row/entry per rank."""
    n_ranks, n = x.shape
    layout = layout_of((SIZES[0], n - SIZES[0]))
    ranges = layout.bucket_ranges(bucket_bytes, 2)
    x = x.copy()  # the means are written in place

    def rank(r, comm):
        grads = BoundGrads(layout)
        grads.vectors = [x[r, :SIZES[0]], x[r, SIZES[0]:]]
        ops = half_scale.NcclOps(comm, NCCL)
        scales = half_scale.WireScales(ranges, n_ranks, half_scale.uses_scale(["float16"], half_scaling))
        scales.begin_step(grads, [ops])
        buf = np.empty(max(hi - lo for lo, hi in ranges), np.uint16)
        bad = sum(half_scale.nccl_mean_bucket(grads, lo, hi, buf[: hi - lo], "float16", scales.factors(i),
                                              ops, NCCL.NCCL_FLOAT16, i)
                  for i, (lo, hi) in enumerate(ranges))
        return bad, list(scales.exponents)

    res, group = run_ranks(n_ranks, rank, order)
    return x, [b for b, _ in res], [e for _, e in res], group


def rel_l2(got, ref) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


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


def decade_gradients(n_ranks: int, seed: int):
    """Rank x element gradients ``0.01 * 10^-d * N(0, 1)``, ``d = j % 5`` (1e-2 .. 1e-6 per element)."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    d = np.arange(n) % 5
    return (rng.standard_normal((n_ranks, n)) * 0.01 * 10.0 ** -d).astype(np.float32), d


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


# -- the GPU algorithm itself, with NumPy standing in for CuPy -----------------------------------------


@pytest.fixture
def numpy_as_cupy(monkeypatch):
    """``cupy`` -> NumPy (zeros, empty), a no-op ``Device``, stream pointer 0, the stand-in's NCCL names."""
    import contextlib
    import sys

    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.__dict__.update(vars(NCCL), available=True)
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl, cuda.Device = nccl, lambda device=None: contextlib.nullcontext()
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0)
    cupy = types.ModuleType("cupy")
    cupy.cuda, cupy.zeros, cupy.empty = cuda, np.zeros, np.empty
    for name, mod in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, mod)
    return cupy


@pytest.mark.parametrize("half_scaling", ["chunk", "predivide"])
def test_nccl_algorithm_runs_the_tested_arithmetic_one_max_per_step(numpy_as_cupy, monkeypatch, half_scaling):
    """NcclAllreduceAlgorithm.run, on 16 ranks: the same bits as the per-rank path above, the
    MAX allreduce once per step before the first SUM (none with predivide), two steps."""
    from hpcsgd.comm import nccl as gpu

    n_ranks = 16
    x, _ = decade_gradients(n_ranks, seed=2)
    want, _, _, _ = mean_on_ranks(x, half_scaling)
    layout = layout_of()
    groups = {}
    monkeypatch.setattr(gpu, "nccl_comm_over", lambda comm, device: groups["g"].comm_of(comm.Get_rank()))

    def rank(r, comm):
        mpi = types.SimpleNamespace(Get_size=lambda: n_ranks, Get_rank=lambda: r)
        alg = gpu.NcclAllreduceAlgorithm(layout, mpi, "float16", 600, 0, half_scaling=half_scaling)
        alg.buf = np.empty(alg.buf.size, np.uint16)  # the CPU kernels' float16 storage
        out = []
        for _ in range(2):
            v = x[r].copy()
            alg.grads = BoundGrads(layout)
            alg.grads.vectors = [v[:SIZES[0]], v[SIZES[0]:]]
            assert [alg.run(i) for i in range(len(alg.ranges))] == [0, 0]
            out.append(v)
        return out

    group = NcclGroup(n_ranks)
    group.comm_of = lambda r: StandInNccl(group, r)
    groups["g"] = group
    res, _ = run_ranks(n_ranks, lambda r, comm: rank(r, comm))
    for r in range(n_ranks):
        for v in res[r]:
            np.testing.assert_array_equal(v, want[r])
    step = ([("uint32", "max")] if half_scaling == "chunk" else []) + [("float16", "sum")] * 2
    assert group.log == step * 2


def test_nccl_communicator_passes_half_scaling_on(monkeypatch):
    from hpcsgd.comm import nccl as gpu

    made = []
    monkeypatch.setattr(gpu, "NcclAllreduceAlgorithm", lambda *a, **k: made.append(k))
    monkeypatch.setattr(gpu, "current_device", lambda: 0)
    s = types.SimpleNamespace(_mpi_comm="world", _wire=lambda: "float16",
                              get_config=lambda k: {"bucket_bytes": 1 << 20, "half_scaling": "predivide"}[k])
    gpu.NcclCommunicator.bucket_algorithm(s, GradLayout([], gpu=True))
    assert made == [{"half_scaling": "predivide"}]


def _numpy_wire_kernels(monkeypatch):
    """The CuPy cast kernels of the inter-node stage as NumPy (float32 / float16 bits in uint16)."""
    from hpcsgd.comm import nccl as gpu

    def unpack(wire):
        return lambda x, s: (_typed(x, wire).astype(np.float32) * s, None)

    def pack(wire):
        def k(x, s, out):
            _typed(out, wire)[...] = (x * s).astype(_typed(out, wire).dtype)
        return k

    monkeypatch.setattr(gpu.wire_kernels, "cupy_unpack_kernel", unpack)
    monkeypatch.setattr(gpu.wire_kernels, "cupy_pack_kernel", pack)


@pytest.mark.parametrize("per_node, nodes, intra", [(4, 1, "float16"), (2, 4, "float32")])
def test_gpu_hierarchical_algorithm_scales_both_levels_alike(numpy_as_cupy, monkeypatch, per_node, nodes,
                                                            intra):
    """GpuHierarchicalAlgorithm.run on one node of 4 (float16 inside the node) and on 4 nodes of 2
    (float32 inside, float16 between): one MAX in the node and one between nodes per step, the
    same bits on every rank, within the float16 sum bound of the float64 mean."""
    from hpcsgd.comm import nccl as gpu

    _numpy_wire_kernels(monkeypatch)
    monkeypatch.setattr(gpu, "nccl_comm_over", lambda comm, device: comm)
    n_ranks = per_node * nodes
    x, _ = decade_gradients(n_ranks, seed=9)
    layout = layout_of()
    intra_groups = [NcclGroup(per_node) for _ in range(nodes)]
    inter_groups = [NcclGroup(nodes) for _ in range(per_node)]
    storage = {"float16": np.uint16, "float32": np.float32}

    def rank(r, _):
        node, k = divmod(r, per_node)
        topo = types.SimpleNamespace(
            uniform=True, size=n_ranks, intra_size=per_node, intra_rank=k, inter_size=nodes,
            intra_comm=StandInNccl(intra_groups[node], k), inter_comm=StandInNccl(inter_groups[k], node))
        alg = gpu.GpuHierarchicalAlgorithm(layout, topo, intra, "float16", 600, 0)
        alg.buf = np.zeros(alg.buf.size, storage[intra])
        alg.shard_inter = np.zeros(alg.shard_inter.size, np.uint16)
        v = x[r].copy()
        alg.grads = BoundGrads(layout)
        alg.grads.vectors = [v[:SIZES[0]], v[SIZES[0]:]]
        assert [alg.run(i) for i in range(len(alg.ranges))] == [0] * len(alg.ranges)
        return v, alg.scales.exponents

    res, _ = run_ranks(n_ranks, rank)
    got = np.stack([v for v, _ in res])
    assert np.all(got == got[0]) and all(e == res[0][1] for _, e in res)
    ref = x.astype(np.float64).mean(axis=0)
    bound = 2 * U * (n_ranks + 1) * np.abs(x).astype(np.float64).mean(axis=0)
    assert np.all(np.abs(got[0] - ref) <= bound)
    n_buckets = len(layout.bucket_ranges(600, wire_kernels.wire_itemsize(intra)))
    assert intra_groups[0].log[0] == ("uint32", "max")
    assert [c for c in intra_groups[0].log if c[1] == "max"] == [("uint32", "max")]
    assert intra_groups[0].log.count(("reduceScatter", intra)) == n_buckets
    if nodes > 1:
        assert inter_groups[0].log == [("uint32", "max")] + [("float16", "sum")] * n_buckets
