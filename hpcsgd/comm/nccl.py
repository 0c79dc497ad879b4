"""GPU gradient means through NCCL (CuPy's binding): ``nccl`` and the GPU half of ``hierarchical``.

Written against the same bucket interface as the CPU algorithms, but **untested
on the development machine** (it has no GPU); the tests skip without CUDA.

* :class:`NcclCommunicator` (``'nccl'``, ChainerMN's ``pure_nccl``): per bucket,
  one CUDA kernel launch packs ``grad / size`` of every parameter piece into a
  device buffer in the wire format (ChainerMN's ``batched_copy``: a device table
  of piece pointers, each thread binary-searches its piece), ``ncclAllReduce(SUM)``
  over all ranks, and a second launch casts back and counts non-finite values
  (one atomic counter). Non-float32 parameters take per-piece elementwise wire_kernels.
  Default wire: float32 (``allreduce_grad_dtype`` float16/bfloat16 halves the
  bytes; NCCL adds 16-bit values hop by hop).
* :class:`GpuHierarchicalAlgorithm`: ``ncclReduceScatter`` inside the node
  (intra wire), ``ncclAllReduce`` of this rank's shard between nodes among ranks
  with the same ``intra_rank`` (float16 by default), ``ncclAllGather`` inside
  the node; used by ``hierarchical`` when the gradients are CuPy arrays.
"""

from __future__ import annotations

import numpy as np

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.packing import BoundGrads, GradLayout
from hpcsgd.comm.reducing import ReducingCommunicator
from hpcsgd.trace import get_tracer
from hpcsgd.watchdog import collective

_GPU_STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def _nccl_dtype(wire: str):
    from cupy.cuda import nccl

    if wire == "bfloat16":
        if not hasattr(nccl, "NCCL_BFLOAT16"):
            raise ValueError("this CuPy/NCCL has no bfloat16; use float16 or float32")
        return nccl.NCCL_BFLOAT16
    return {"float32": nccl.NCCL_FLOAT32, "float16": nccl.NCCL_FLOAT16}[wire]


def nccl_comm_over(mpi_comm):
    """A ``cupy.cuda.nccl.NcclCommunicator`` over the ranks of ``mpi_comm`` (collective)."""
    from cupy.cuda import nccl

    uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
    uid = mpi_comm.bcast(uid, root=0)
    return nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank())


class GpuBoundGrads(BoundGrads):
    """CuPy gradients: one batched kernel launch per bucket (float32 params), else per piece."""

    _kernels = None

    def _table(self, lo, hi):
        import cupy

        pieces = self.layout.pieces(lo, hi)
        views = [self.piece(i, a, b) for i, a, b in pieces]
        if not all(v.dtype == np.float32 for v in views):
            return None, pieces
        ptrs = np.array([v.data.ptr for v in views], np.int64)
        csum = np.array([a - lo for _, a, _ in pieces], np.int64)
        return (cupy.asarray(ptrs), cupy.asarray(csum), np.int32(len(views))), pieces

    def _launch(self, kern, n, *args):
        threads = 256
        kern(((n + threads - 1) // threads,), (threads,), args)

    def pack(self, lo, hi, dst, scale, wire):
        if GpuBoundGrads._kernels is None:
            GpuBoundGrads._kernels = wire_kernels.cupy_batched_kernels()
        table, pieces = self._table(lo, hi)
        if table is not None and pieces:
            self._launch(GpuBoundGrads._kernels[0], hi - lo, *table, dst, np.int64(hi - lo),
                         np.float32(scale), np.int32(wire_kernels.wire_code(wire)))
            return
        kern = wire_kernels.cupy_pack_kernel(wire)
        for i, a, b in pieces:
            kern(self.piece(i, a, b).astype(np.float32, copy=False), np.float32(scale), dst[a - lo:b - lo])

    def unpack(self, lo, hi, src, scale, wire) -> int:
        import cupy

        if GpuBoundGrads._kernels is None:
            GpuBoundGrads._kernels = wire_kernels.cupy_batched_kernels()
        table, pieces = self._table(lo, hi)
        bad = cupy.zeros((), np.uint64)
        if table is not None and pieces:
            self._launch(GpuBoundGrads._kernels[1], hi - lo, *table, src, np.int64(hi - lo),
                         np.float32(scale), np.int32(wire_kernels.wire_code(wire)), bad)
            return int(bad)
        kern = wire_kernels.cupy_unpack_kernel(wire)
        for i, a, b in pieces:
            g = self.piece(i, a, b)
            y, flags = kern(src[a - lo:b - lo], np.float32(scale))
            g[...] = y.astype(g.dtype, copy=False)
            bad += flags.sum().astype(np.uint64)
        return int(bad)


class _GpuAlgorithm(BucketAlgorithm):
    def bind(self, grads: BoundGrads) -> None:
        gpu = GpuBoundGrads.__new__(GpuBoundGrads)
        gpu.layout, gpu.vectors = grads.layout, grads.vectors
        self.grads = gpu


class NcclAllreduceAlgorithm(_GpuAlgorithm):
    """Pack -> ncclAllReduce over all ranks -> unpack, per bucket."""

    def __init__(self, layout: GradLayout, mpi_comm, wire: str, bucket_bytes: int):
        import cupy

        super().__init__(layout, layout.bucket_ranges(bucket_bytes, wire_kernels.wire_itemsize(wire)))
        self.wire, self.size = wire, mpi_comm.Get_size()
        self.wire_label = wire
        self.low_precision = wire != "float32"
        self.nccl = nccl_comm_over(mpi_comm)
        width = max((hi - lo for lo, hi in self.ranges), default=0)
        self.buf = cupy.empty(width, _GPU_STORAGE[wire])

    def run(self, i: int) -> int:
        import cupy
        from cupy.cuda import nccl

        lo, hi = self.ranges[i]
        buf = self.buf[: hi - lo]
        info = {"bytes": int(buf.nbytes), "dtype": self.wire, "bucket": i}
        stream = cupy.cuda.get_current_stream()
        with get_tracer().span("pack", **info):
            self.grads.pack(lo, hi, buf, 1.0 / self.size, self.wire)
        with get_tracer().span("allreduce", **info), collective("allreduce_nccl", bucket=i):
            self.nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, _nccl_dtype(self.wire),
                                nccl.NCCL_SUM, stream.ptr)
        with get_tracer().span("unpack", **info):
            return self.grads.unpack(lo, hi, buf, 1.0, self.wire)


class GpuHierarchicalAlgorithm(_GpuAlgorithm):
    """ncclReduceScatter (node) -> ncclAllReduce of the shard (between nodes) -> ncclAllGather (node)."""

    def __init__(self, layout: GradLayout, topology, intra_wire: str, inter_wire: str, bucket_bytes: int):
        import cupy

        super().__init__(layout, layout.bucket_ranges(bucket_bytes, wire_kernels.wire_itemsize(intra_wire)))
        self.size, self.k, self.r = topology.size, topology.intra_size, topology.intra_rank
        self.intra_wire, self.inter_wire = intra_wire, inter_wire
        self.low_precision = intra_wire != "float32" or (topology.inter_size > 1 and inter_wire != "float32")
        self.wire_label = intra_wire if topology.inter_size == 1 else f"{intra_wire}/{inter_wire}"
        self.intra = nccl_comm_over(topology.intra_comm)
        self.inter = nccl_comm_over(topology.inter_comm) if topology.inter_size > 1 else None
        width = max((hi - lo for lo, hi in self.ranges), default=0)
        self.chunk_max = -(-width // self.k)
        self.buf = cupy.zeros(self.chunk_max * self.k, _GPU_STORAGE[intra_wire])
        self.shard32 = cupy.empty(self.chunk_max, np.float32)
        self.shard_inter = cupy.empty(self.chunk_max, _GPU_STORAGE[inter_wire])

    def run(self, i: int) -> int:
        import cupy
        from cupy.cuda import nccl

        lo, hi = self.ranges[i]
        n = hi - lo
        chunk = -(-n // self.k)
        buf = self.buf[: chunk * self.k]
        info = {"bytes": int(n * buf.itemsize), "dtype": self.intra_wire, "bucket": i}
        stream = cupy.cuda.get_current_stream().ptr
        with get_tracer().span("pack", **info):
            buf[n:] = 0
            self.grads.pack(lo, hi, buf, 1.0 / self.size, self.intra_wire)
        with get_tracer().span("allreduce", inter_dtype=self.inter_wire, **info), \
                collective("allreduce_nccl_hier", bucket=i):
            mine = buf[self.r * chunk:(self.r + 1) * chunk]
            dt = _nccl_dtype(self.intra_wire)
            self.intra.reduceScatter(buf.data.ptr, mine.data.ptr, chunk, dt, nccl.NCCL_SUM, stream)
            if self.inter is not None:
                s32 = self.shard32[:chunk]
                s32[...] = wire_kernels.cupy_unpack_kernel(self.intra_wire)(mine, np.float32(1.0))[0]
                sw = self.shard_inter[:chunk]
                wire_kernels.cupy_pack_kernel(self.inter_wire)(s32, np.float32(1.0), sw)
                self.inter.allReduce(sw.data.ptr, sw.data.ptr, chunk, _nccl_dtype(self.inter_wire),
                                     nccl.NCCL_SUM, stream)
                s32[...] = wire_kernels.cupy_unpack_kernel(self.inter_wire)(sw, np.float32(1.0))[0]
                wire_kernels.cupy_pack_kernel(self.intra_wire)(s32, np.float32(1.0), mine)
            self.intra.allGather(mine.data.ptr, buf.data.ptr, chunk, dt, stream)
        with get_tracer().span("unpack", **info):
            return self.grads.unpack(lo, hi, buf, 1.0, self.intra_wire)


class NcclCommunicator(ReducingCommunicator):
    """One NCCL allreduce per bucket of the packed CuPy gradients (ChainerMN ``pure_nccl``)."""

    DEFAULT_WIRE = ("float32", "float32")

    def _topology_kwargs(self) -> dict:
        return {"use_gpu": True}

    def _wire(self) -> str:
        intra, inter = self.wire_formats()
        return inter if self.inter_size > 1 else intra

    def bucket_algorithm(self, layout: GradLayout) -> BucketAlgorithm:
        import cupy

        if not layout.gpu and len(layout):
            raise ValueError("the 'nccl' communicator reduces CuPy gradients (call model.to_device(...) "
                             "first); for NumPy use 'hierarchical' or 'flat'")
        cupy.cuda.Device(self.topology.device).use()
        return NcclAllreduceAlgorithm(layout, self._mpi_comm, self._wire(),
                                      self.get_config("bucket_bytes"))
