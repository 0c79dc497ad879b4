"""GPU gradient means through NCCL (CuPy's binding): ``nccl`` and the GPU half of ``hierarchical``.

Written against the same bucket interface as the CPU algorithms, but **not yet
run on a GPU** (the development machine has none): the logic around the CUDA
calls is tested with stand-in objects (``tests/test_gpu_*.py``), the CUDA calls
themselves by ``benchmarks/gpu_validate.sh`` on a GPU machine. See docs/gpu.md.

* :class:`NcclAllreduceAlgorithm` (``'nccl'``, ChainerMN's ``pure_nccl``; also
  ``hierarchical`` on GPU when nodes hold different numbers of ranks or one rank
  each): per bucket, one CUDA kernel launch packs ``grad / size`` of every
  parameter piece into a device buffer in the wire format (ChainerMN's
  ``batched_copy``: a device table of piece pointers, each thread binary-searches
  its piece), ``ncclAllReduce(SUM)`` over all ranks, and a second launch casts back
  and counts non-finite values into one device counter. Non-float32 parameters
  take per-piece elementwise wire_kernels. Default wire: float32. A float16 wire
  is scaled by ``2^e`` per bucket, the same on all ranks, instead of ``1 / size``
  (``half_scaling='chunk'``, the default; :mod:`hpcsgd.comm.half_scale`).
* :class:`GpuHierarchicalAlgorithm`: ``ncclReduceScatter`` inside the node
  (intra wire), ``ncclAllReduce`` of this rank's shard between nodes among ranks
  with the same ``intra_rank`` (float16 by default), ``ncclAllGather`` inside
  the node. Needs the same number of ranks on every node (equal shards). With a
  float16 wire at either level the packed values are ``grad * 2^e`` as in ``nccl``.
* :class:`GpuPackOnlyAlgorithm`: ``dummy`` on GPU (pack + unpack, no communication).

Why only the last bucket synchronises: every bucket is only *enqueued* on the
current CUDA stream (packing, NCCL, unpacking), so the host never waits per
bucket and the GPU overlaps buckets with whatever comes next on the host. The
non-finite counts of all buckets add up in one device counter; the last bucket
reads it, the one blocking host sync per step, inside ``collective(...)`` so that
a hung NCCL call (a GPU kernel waiting forever for a peer) is seen and named by
the watchdog. ``run(i)`` returns 0 for the other buckets, the total for the last.
A scaled float16 wire adds a second sync, in the first bucket: the host reads the
step's per-bucket maxima after their MAX allreduce to choose the exponents
(:class:`~hpcsgd.comm.half_scale.WireScales`, also inside ``collective``).

Every CUDA call runs under ``cupy.cuda.Device(self.device)`` and on the stream
that was current when the gradients were bound, as CuPy's current device and
stream are per thread (a worker thread would otherwise use GPU 0, and with
per-thread default streams lose the order with backward and the update). The
NCCL communicators are created on that device; ``free()`` destroys them.
"""

from __future__ import annotations

import contextlib

import numpy as np

from hpcsgd.comm import wire_gpu, wire_kernels
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.dummy import pack_unpack_bucket
from hpcsgd.comm.half_scale import NcclOps, WireScales, nccl_mean_bucket, uses_scale
from hpcsgd.comm.nccl_setup import (  # noqa: F401  (re-exported: the GPU path's set-up)
    INSTALL_HINT,
    _cupy_nccl,
    _nccl_dtype,
    current_device,
    device_allreduce,
    nccl_comm_over,
    nccl_problem,
    require_nccl,
)
from hpcsgd.comm.packing import BoundGrads, GradLayout
from hpcsgd.comm.reducing import ReducingCommunicator
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.runtime.watchdog import collective

_GPU_STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}

class PieceTables:
    """Device pointer tables of the batched kernels, one per bucket, rebuilt only when a pointer moves.

    Chainer makes new gradient arrays every backward, but CuPy's memory pool
    usually hands back the same addresses, so a table is uploaded (one
    host-to-device copy, which waits for the stream) only when a gradient
    actually moved; pack and unpack of a bucket share it, and the prefix sums
    never change.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[int, int], tuple] = {}

    def get(self, key: tuple[int, int], ptrs: tuple[int, ...], csum: list[int], upload):
        """``(device ptrs, device csum, n)`` of bucket ``key``; ``upload(array)`` copies to the device."""
        hit = self._tables.get(key)
        if hit is not None and hit[0] == ptrs:
            return hit[1]
        dev_csum = hit[1][1] if hit is not None else upload(np.asarray(csum, np.int64))
        table = (upload(np.asarray(ptrs, np.int64)), dev_csum, np.int32(len(ptrs)))
        self._tables[key] = (ptrs, table)
        return table


class GpuBoundGrads(BoundGrads):
    """CuPy gradients: one batched kernel launch per bucket (float32 params), else per piece."""

    _kernels = None

    def __init__(self, grads: BoundGrads, tables: PieceTables, bad) -> None:
        self.layout, self.vectors = grads.layout, grads.vectors
        self.tables = tables
        self.bad = bad  # device uint64 counter of non-finite results (added to, never read here)

    def _table(self, lo, hi):
        import cupy

        pieces = self.layout.pieces(lo, hi)
        views = [self.piece(i, a, b) for i, a, b in pieces]
        if not views or not all(v.dtype == np.float32 for v in views):
            return None, pieces
        ptrs = tuple(int(v.data.ptr) for v in views)
        return self.tables.get((lo, hi), ptrs, [a - lo for _, a, _ in pieces], cupy.asarray), pieces

    def _launch(self, kern, n, *args):
        threads = 256
        kern(((n + threads - 1) // threads,), (threads,), args)

    def _batched(self):
        if GpuBoundGrads._kernels is None:
            GpuBoundGrads._kernels = wire_gpu.cupy_batched_kernels()
        return GpuBoundGrads._kernels

    def pack(self, lo, hi, dst, scale, wire):
        table, pieces = self._table(lo, hi)
        if table is not None:
            self._launch(self._batched()[0], hi - lo, *table, dst, np.int64(hi - lo),
                         np.float32(scale), np.int32(wire_gpu.wire_code(wire)))
            return
        kern = wire_gpu.cupy_pack_kernel(wire)
        for i, a, b in pieces:
            kern(self.piece(i, a, b).astype(np.float32, copy=False), np.float32(scale), dst[a - lo:b - lo])

    def unpack(self, lo, hi, src, scale, wire) -> int:
        """Enqueue the unpack; non-finite results are added to ``self.bad`` on the device. Returns 0."""
        table, pieces = self._table(lo, hi)
        if table is not None:
            self._launch(self._batched()[1], hi - lo, *table, src, np.int64(hi - lo),
                         np.float32(scale), np.int32(wire_gpu.wire_code(wire)), self.bad)
            return 0
        kern = wire_gpu.cupy_unpack_kernel(wire)
        for i, a, b in pieces:
            g = self.piece(i, a, b)
            y, flags = kern(src[a - lo:b - lo], np.float32(scale))
            g[...] = y.astype(g.dtype, copy=False)
            self.bad += flags.sum(dtype=np.uint64)
        return 0


def read_count(counter, name: str, **info) -> int:
    """``int(counter)`` (a device scalar: blocks until the stream got there) inside ``collective(name)``.

    This is where a hung NCCL call blocks the host, so it must be inside the
    watchdog's view.
    """
    with collective(name, **info):
        return int(counter)


class _GpuAlgorithm(BucketAlgorithm):
    """Device bookkeeping shared by the GPU algorithms: device context, counter, tables, free()."""

    #: watchdog name of the end-of-step synchronisation
    sync_name = "allreduce_nccl_sync"

    def _init_device(self, device: int) -> None:
        import cupy

        self.device = int(device)
        self._stream = None  # the stream of the thread that bound the gradients (see bind)
        self._comms: list = []
        with cupy.cuda.Device(self.device):
            self._bad = cupy.zeros((), np.uint64)
        self._tables = PieceTables()

    def bind(self, grads: BoundGrads) -> None:
        on = {int(v.device.id) for v in grads.vectors}
        if on - {self.device}:
            raise ValueError(f"gradients are on GPU {sorted(on)}, but this communicator's NCCL set-up "
                             f"is on GPU {self.device}: select the device (cupy.cuda.Device(d).use()) "
                             f"before the first gradient mean and keep it")
        import cupy

        with cupy.cuda.Device(self.device):
            self._bad.fill(0)  # a step that failed half-way may have left counts
        # buckets run on the binding thread's stream, also from a worker thread (CuPy's current
        # stream is per thread), so they stay ordered with backward before and the update after
        self._stream = cupy.cuda.get_current_stream()
        self.grads = GpuBoundGrads(grads, self._tables, self._bad)

    def run(self, i: int) -> int:
        import cupy

        stream = self._stream if self._stream is not None else contextlib.nullcontext()
        with cupy.cuda.Device(self.device), stream:
            self._enqueue(i)
            if i != len(self.ranges) - 1:
                return 0
            n = read_count(self._bad, self.sync_name, buckets=len(self.ranges))
            self._bad.fill(0)
            return n

    def _enqueue(self, i: int) -> None:
        raise NotImplementedError

    def free(self) -> None:
        """Destroy the NCCL communicators (``ncclCommDestroy``; local, waits for their pending work)."""
        comms, self._comms = getattr(self, "_comms", []), []
        if not comms:
            return
        import cupy

        with cupy.cuda.Device(self.device):
            for c in comms:
                c.destroy()


class GpuPackOnlyAlgorithm(_GpuAlgorithm):
    """``dummy`` on GPU: pack and unpack each bucket with the NCCL path's kernels, no communication."""

    sync_name = "pack_only_sync"

    def __init__(self, layout: GradLayout, wire: str, bucket_bytes: int, device: int):
        import cupy

        super().__init__(layout, layout.bucket_ranges(bucket_bytes, wire_kernels.wire_itemsize(wire)))
        self.wire = self.wire_label = wire
        self.low_precision = wire != "float32"
        self._init_device(device)
        width = max((hi - lo for lo, hi in self.ranges), default=0)
        with cupy.cuda.Device(self.device):
            self.buf = cupy.empty(width, _GPU_STORAGE[wire])

    def _enqueue(self, i: int) -> None:
        lo, hi = self.ranges[i]
        pack_unpack_bucket(self.grads, lo, hi, self.buf[: hi - lo], self.wire, i)  # returns 0: see unpack


class NcclAllreduceAlgorithm(_GpuAlgorithm):
    """Pack -> ncclAllReduce over all ranks -> unpack, per bucket (float16: scaled, see half_scale)."""

    sync_name = "allreduce_nccl_sync"

    def __init__(self, layout: GradLayout, mpi_comm, wire: str, bucket_bytes: int, device: int,
                 half_scaling: str = "chunk"):
        import cupy

        super().__init__(layout, layout.bucket_ranges(bucket_bytes, wire_kernels.wire_itemsize(wire)))
        self.wire, self.size = wire, mpi_comm.Get_size()
        self.wire_label = wire
        self.low_precision = wire != "float32"
        self._init_device(device)
        self.scales = WireScales(self.ranges, self.size, uses_scale([wire], half_scaling), cupy)
        self.nccl = nccl_comm_over(mpi_comm, self.device)
        self._comms.append(self.nccl)
        width = max((hi - lo for lo, hi in self.ranges), default=0)
        with cupy.cuda.Device(self.device):
            self.buf = cupy.empty(width, _GPU_STORAGE[wire])

    def _enqueue(self, i: int) -> None:
        import cupy
        from cupy.cuda import nccl

        lo, hi = self.ranges[i]
        ops = NcclOps(self.nccl, nccl, cupy.cuda.get_current_stream().ptr)
        if i == 0:  # every bucket's exponent of this step (scaled float16 only)
            self.scales.begin_step(self.grads, [ops])
        nccl_mean_bucket(self.grads, lo, hi, self.buf[: hi - lo], self.wire, self.scales.factors(i), ops,
                         _nccl_dtype(self.wire), i)


class GpuHierarchicalAlgorithm(_GpuAlgorithm):
    """ncclReduceScatter (node) -> ncclAllReduce of the shard (between nodes) -> ncclAllGather (node)."""

    sync_name = "allreduce_nccl_hier_sync"

    def __init__(self, layout: GradLayout, topology, intra_wire: str, inter_wire: str, bucket_bytes: int,
                 device: int, half_scaling: str = "chunk"):
        import cupy

        if not topology.uniform:
            raise ValueError("GpuHierarchicalAlgorithm needs the same number of ranks on every node "
                             "(equal NCCL shards); use NcclAllreduceAlgorithm")
        super().__init__(layout, layout.bucket_ranges(bucket_bytes, wire_kernels.wire_itemsize(intra_wire)))
        self.wire_label = intra_wire if topology.inter_size == 1 else f"{intra_wire}/{inter_wire}"
        self._init_device(device)
        self.size, self.k, self.r = topology.size, topology.intra_size, topology.intra_rank
        self.intra_wire, self.inter_wire = intra_wire, inter_wire
        self.low_precision = intra_wire != "float32" or (topology.inter_size > 1 and inter_wire != "float32")
        self.intra = nccl_comm_over(topology.intra_comm, self.device)
        self.inter = nccl_comm_over(topology.inter_comm, self.device) if topology.inter_size > 1 else None
        self._comms += [c for c in (self.intra, self.inter) if c is not None]
        wires = [intra_wire] + ([inter_wire] if self.inter is not None else [])
        self.scales = WireScales(self.ranges, self.size, uses_scale(wires, half_scaling), cupy)
        width = max((hi - lo for lo, hi in self.ranges), default=0)
        self.chunk_max = -(-width // self.k)
        with cupy.cuda.Device(self.device):
            self.buf = cupy.zeros(self.chunk_max * self.k, _GPU_STORAGE[intra_wire])
            self.shard32 = cupy.empty(self.chunk_max, np.float32)
            self.shard_inter = cupy.empty(self.chunk_max, _GPU_STORAGE[inter_wire])

    def _enqueue(self, i: int) -> None:
        import cupy
        from cupy.cuda import nccl

        lo, hi = self.ranges[i]
        n = hi - lo
        chunk = -(-n // self.k)
        buf = self.buf[: chunk * self.k]
        info = {"bytes": int(n * buf.itemsize), "dtype": self.intra_wire, "bucket": i}
        stream = cupy.cuda.get_current_stream().ptr
        intra = NcclOps(self.intra, nccl, stream)
        inter = NcclOps(self.inter, nccl, stream) if self.inter is not None else None
        if i == 0:  # exponents: max over the node, then between nodes = over all ranks
            self.scales.begin_step(self.grads, [o for o in (intra, inter) if o is not None])
        pack_f, unpack_f = self.scales.factors(i)
        with get_tracer().span("pack", **info):
            buf[n:] = 0
            self.grads.pack(lo, hi, buf, pack_f, self.intra_wire)
        with get_tracer().span("allreduce", inter_dtype=self.inter_wire, **info), \
                collective("allreduce_nccl_hier", bucket=i):
            mine = buf[self.r * chunk:(self.r + 1) * chunk]
            dt = _nccl_dtype(self.intra_wire)
            intra.reduce_scatter(buf, mine, dt, nccl.NCCL_SUM)
            if inter is not None:
                self._between_nodes(mine, inter)
            intra.all_gather(mine, buf, dt)
        with get_tracer().span("unpack", **info):
            self.grads.unpack(lo, hi, buf, unpack_f, self.intra_wire)

    def _between_nodes(self, mine, inter: NcclOps) -> None:
        """This rank's shard (intra wire) summed over the nodes in the inter wire, in place."""
        chunk = mine.size
        s32 = self.shard32[:chunk]
        s32[...] = wire_gpu.cupy_unpack_kernel(self.intra_wire)(mine, np.float32(1.0))[0]
        sw = self.shard_inter[:chunk]
        wire_gpu.cupy_pack_kernel(self.inter_wire)(s32, np.float32(1.0), sw)
        inter.allreduce(sw, _nccl_dtype(self.inter_wire), inter.nccl.NCCL_SUM)
        s32[...] = wire_gpu.cupy_unpack_kernel(self.inter_wire)(sw, np.float32(1.0))[0]
        wire_gpu.cupy_pack_kernel(self.intra_wire)(s32, np.float32(1.0), mine)


class NcclCommunicator(ReducingCommunicator):
    """One NCCL allreduce per bucket of the packed CuPy gradients (ChainerMN ``pure_nccl``)."""

    DEFAULT_WIRE = ("float32", "float32")

    def _topology_kwargs(self) -> dict:
        return {"use_gpu": True}

    def bucket_algorithm(self, layout: GradLayout) -> BucketAlgorithm:
        if not layout.gpu and len(layout):
            raise ValueError("the 'nccl' communicator reduces CuPy gradients (call model.to_device(...) "
                             "first); for NumPy use 'hierarchical' or 'flat'")
        return NcclAllreduceAlgorithm(layout, self._mpi_comm, self.single_wire(),
                                      self.get_config("bucket_bytes"), current_device(),
                                      half_scaling=self.get_config("half_scaling"))
