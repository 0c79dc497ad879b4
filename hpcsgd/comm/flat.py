"""``flat``: one MPI allreduce over all ranks of the packed gradients, bucket by bucket.

Per bucket (``bucket_bytes`` of wire data, default 4 MiB):

1. pack: ``buf = wire(grad / size)`` (one fused numba pass);
2. reduce: float32 -> ``MPI_Allreduce(IN_PLACE, SUM)``; bfloat16 (and float16
   with ``half_scaling='predivide'``) ->
   :class:`~hpcsgd.comm.fp16_reduce.LowPrecisionAllreduce` (pairwise reduce-scatter +
   float32 accumulation + pairwise allgather), since MPI's own float16 sum is slow;
3. unpack: ``grad = float32(buf)`` with the non-finite count in the same pass.

float16 (default ``half_scaling='chunk'``): the three steps are one
:class:`~hpcsgd.comm.fp16_reduce.ScaledHalfAllreduce` that reads the gradients
chunk by chunk, packing each chunk with its own power-of-two scale right before
it is sent, and writes the decoded sums back.

The whole rank set is one level, so the wire format is ``allreduce_grad_dtype``
(or ``inter_dtype``/``intra_dtype`` if set; default float32: on one node the two
casts cost more than the bytes they save, see docs/comm_algorithms.md).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.fp16_reduce import (
    GradSource,
    LowPrecisionAllreduce,
    ScaledHalfAllreduce,
    check_half_scaling,
    check_wire_ranks,
)
from hpcsgd.comm.packing import GradLayout
from hpcsgd.comm.reducing import ReducingCommunicator
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.runtime.watchdog import collective


class FlatAlgorithm(BucketAlgorithm):
    """Pack, reduce over ``comm``, unpack, one bucket at a time."""

    def __init__(self, layout: GradLayout, comm, wire: str, bucket_bytes: int,
                 half_scaling: str = "chunk", wire_ranks: int | None = None):
        super().__init__(layout, layout.bucket_ranges(bucket_bytes, wire_kernels.wire_itemsize(wire)))
        self.comm = comm.Dup()  # private: buckets may run on a worker thread
        self.size = comm.Get_size()
        self.wire = self.wire_label = wire
        self.low_precision = wire != "float32"
        # study option: the 16-bit wire divides by wire_ranks instead of size, rescaled after
        n_wire = check_wire_ranks(wire_ranks) or self.size
        self._pre, self._post = 1.0 / n_wire, n_wire / self.size
        self._scaled = None
        if wire == "float16" and check_half_scaling(half_scaling) == "chunk":
            self._scaled = ScaledHalfAllreduce(self.comm)
        width = max((hi - lo for lo, hi in self.ranges), default=0) if self._scaled is None else 0
        self.buf = np.empty(width, wire_kernels.wire_storage_dtype(wire))
        self._lowp = LowPrecisionAllreduce(self.comm, wire) if self.low_precision else None

    def run(self, i: int) -> int:
        lo, hi = self.ranges[i]
        tracer = get_tracer()
        if self._scaled is not None:  # pack, reduce and unpack chunk by chunk inside
            with tracer.span("allreduce", bytes=int(2 * (hi - lo)), dtype="float16", bucket=i):
                return self._scaled(GradSource(self.grads, lo, hi - lo, self._pre, self._post))
        buf = self.buf[: hi - lo]
        info = {"bytes": int(buf.nbytes), "dtype": self.wire, "bucket": i}
        scale = 1.0 / self.size if self.wire == "float32" else self._pre
        with tracer.span("pack", **info):
            self.grads.pack(lo, hi, buf, scale, self.wire)
        with tracer.span("allreduce", **info):
            if self.size > 1:
                if self._lowp is not None:
                    self._lowp(buf)
                else:
                    with collective("allreduce", nbytes=int(buf.nbytes), bucket=i):
                        self.comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
        with tracer.span("unpack", **info):
            return self.grads.unpack(lo, hi, buf, 1.0 if self.wire == "float32" else self._post, self.wire)

    def free(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


class FlatCommunicator(ReducingCommunicator):
    """Bucketed MPI allreduce of the packed gradients over all ranks (CPU)."""

    DEFAULT_WIRE = ("float32", "float32")

    def bucket_algorithm(self, layout: GradLayout) -> FlatAlgorithm:
        if layout.gpu:
            raise ValueError("the 'flat' communicator reduces NumPy gradients; for CuPy use 'nccl' "
                             "or 'hierarchical'")
        return FlatAlgorithm(layout, self._mpi_comm, self.single_wire(), self.get_config("bucket_bytes"),
                             **self.half_wire_options())
