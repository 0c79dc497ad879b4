"""``naive``: one MPI Allreduce per parameter, no packing (ChainerMN's CPU baseline).

The bucket algorithm has one bucket per parameter (layout order). float32 wire:
``MPI_Allreduce(IN_PLACE, SUM)`` on the gradient itself, then ``grad *= 1/size``
fused with the non-finite count (one numba pass); 16-bit wire: cast ``grad/size``
to a 16-bit buffer, :class:`~hpcsgd.comm.fp16_reduce.LowPrecisionAllreduce`,
cast back. Useful as a reference and for models with few, large parameters;
``flat``/``hierarchical`` are faster for many small ones. NumPy gradients only.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.fp16_reduce import LowPrecisionAllreduce
from hpcsgd.comm.packing import GradLayout
from hpcsgd.comm.reducing import ReducingCommunicator
from hpcsgd.trace import get_tracer
from hpcsgd.watchdog import collective


class PerParameterAlgorithm(BucketAlgorithm):
    """Bucket ``i`` is parameter ``i``: reduced in its own gradient array over ``comm``."""

    def __init__(self, layout: GradLayout, comm, wire: str):
        super().__init__(layout, [(s.offset, s.offset + s.size) for s in layout.slots])
        self.comm = comm.Dup()  # private: buckets may run on a worker thread
        self.size = comm.Get_size()
        self.wire = self.wire_label = wire
        self.low_precision = wire != "float32"
        self._lowp = LowPrecisionAllreduce(self.comm, wire) if self.low_precision and self.size > 1 else None

    def run(self, i: int) -> int:
        g = self.grads.vectors[i]
        name = self.layout.slots[i].name
        size, wire = self.size, self.wire
        tracer = get_tracer()
        info = {"bytes": int(g.size * wire_kernels.wire_itemsize(wire)), "dtype": wire, "param": name}
        if wire == "float32" and g.dtype == np.float32:
            with tracer.span("allreduce", **info), collective("allreduce", param=name):
                if size > 1:
                    self.comm.Allreduce(MPI.IN_PLACE, [g, MPI.FLOAT], op=MPI.SUM)
            with tracer.span("unpack", **info):
                return wire_kernels.scale_and_count(g, 1.0 / size)
        buf = np.empty(g.size, wire_kernels.wire_storage_dtype(wire))
        with tracer.span("pack", **info):
            wire_kernels.pack_into(g, buf, 1.0 / size, wire)
        with tracer.span("allreduce", **info), collective("allreduce", param=name):
            if self._lowp is not None:
                self._lowp(buf)
            elif size > 1:
                self.comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
        with tracer.span("unpack", **info):
            return wire_kernels.unpack_from(buf, g, 1.0, wire)

    def free(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


class NaiveCommunicator(ReducingCommunicator):
    """Per-parameter MPI allreduce over all ranks (CPU)."""

    DEFAULT_WIRE = ("float32", "float32")

    def wire(self) -> str:
        intra, inter = self.wire_formats()
        return inter if self.inter_size > 1 else intra

    def bucket_algorithm(self, layout: GradLayout) -> PerParameterAlgorithm:
        if layout.gpu:
            raise ValueError("the 'naive' communicator reduces NumPy gradients; for CuPy use 'nccl' "
                             "or 'hierarchical'")
        return PerParameterAlgorithm(layout, self._mpi_comm, self.wire())
