"""The GPU algorithms themselves on CPU: ``NcclAllreduceAlgorithm``, ``GpuHierarchicalAlgorithm`` (and
``GpuPackOnlyAlgorithm``, which must pack and unpack as the CPU ``dummy`` does).

Their ``run`` is driven for several simulated ranks with NumPy standing in for CuPy (and
NumPy casts for the two CuPy cast kernels of the inter-node stage) against the stand-in
NCCL of tests/nccl_standin.py: the scaled float16 wire must give the bits of the per-rank
path tested in tests/test_nccl_half_scale.py, the same bits on every rank, one MAX
allreduce per step and communicator level, and stay within the float16 sum bound of the
float64 mean. Nothing here touches CUDA.
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
from nccl_standin import (
    NCCL,
    SIZES,
    NcclGroup,
    StandInNccl,
    U,
    _typed,
    decade_gradients,
    layout_of,
    mean_on_ranks,
    run_ranks,
)

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.packing import BoundGrads, GradLayout

# -- the GPU algorithm itself, with NumPy standing in for CuPy -----------------------------------------


@pytest.fixture
def numpy_as_cupy(monkeypatch):
    """``cupy`` -> NumPy (zeros, empty), a no-op ``Device``, stream pointer 0, the stand-in's NCCL names."""
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
    s = types.SimpleNamespace(_mpi_comm="world", single_wire=lambda: "float16",
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

    monkeypatch.setattr(gpu.wire_gpu, "cupy_unpack_kernel", unpack)
    monkeypatch.setattr(gpu.wire_gpu, "cupy_pack_kernel", pack)


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


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_gpu_pack_only_algorithm_packs_and_unpacks_as_dummy(numpy_as_cupy, monkeypatch, wire):
    """GpuPackOnlyAlgorithm.run (``dummy`` on GPU) and DummyAlgorithm.run on the same gradients:
    the same buckets, the same bits back (cast through the wire format), the same pack/unpack
    spans, and 0 from every bucket (non-finite counts go to the device counter, all finite here)."""
    from contextlib import contextmanager

    from hpcsgd.comm import dummy
    from hpcsgd.comm import nccl as gpu

    spans = []

    class Recorder:
        @contextmanager
        def span(self, name, **args):
            spans.append((name, args))
            yield

    for mod in (dummy, gpu):  # wherever the spans are opened
        monkeypatch.setattr(mod, "get_tracer", lambda: Recorder())
    x, _ = decade_gradients(1, seed=4)
    layout = layout_of()
    storage = wire_kernels.wire_storage_dtype(wire)  # the CPU kernels' storage (float16 as uint16 bits)
    out = []
    for alg in (dummy.DummyAlgorithm(layout, wire, 600), gpu.GpuPackOnlyAlgorithm(layout, wire, 600, 0)):
        alg.buf = np.empty(alg.buf.size, storage)
        v = (x[0] * 1e3).astype(np.float32)
        alg.grads = BoundGrads(layout)
        alg.grads.vectors = [v[:SIZES[0]], v[SIZES[0]:]]
        assert [alg.run(i) for i in range(len(alg.ranges))] == [0] * len(alg.ranges)
        out.append((alg.ranges, v, list(spans)))
        spans.clear()
    (cpu_ranges, cpu_v, cpu_spans), (gpu_ranges, gpu_v, gpu_spans) = out
    assert cpu_ranges == gpu_ranges and len(cpu_ranges) > 1
    np.testing.assert_array_equal(gpu_v, cpu_v)
    if wire != "float32":
        assert not np.array_equal(cpu_v, (x[0] * 1e3).astype(np.float32))  # it did cast
    assert gpu_spans == cpu_spans and [n for n, _ in cpu_spans] == ["pack", "unpack"] * len(cpu_ranges)
