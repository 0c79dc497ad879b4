"""``naive``: one MPI Allreduce per parameter, no packing (ChainerMN's CPU baseline).

The bucket algorithm has one bucket per parameter (layout order). float32 wire:
``MPI_Allreduce(IN_PLACE, SUM)`` on the gradient itself, then ``grad *= 1/size``
fused with the non-finite count (one numba pass); float16 wire:
:class:`~hpcsgd.comm.fp16_reduce.ScaledHalfAllreduce` on the gradient (a power-of-two
scale per message); bfloat16 (or ``half_scaling='predivide'``): cast ``grad/size`` to a
16-bit buffer, :class:`~hpcsgd.comm.fp16_reduce.LowPrecisionAllreduce`, cast back.
Useful as a reference and for models with few, large parameters; ``flat``/``hierarchical``
are faster for many small ones. NumPy gradients only.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.fp16_reduce import (
    ArraySource,
    LowPrecisionAllreduce,
    ScaledHalfAllreduce,
    check_half_scaling,
    check_wire_ranks,
)
from hpcsgd.comm.packing import GradLayout
from hpcsgd.comm.reducing import ReducingCommunicator
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.runtime.watchdog import collective


class PerParameterAlgorithm(BucketAlgorithm):
    """Bucket ``i`` is parameter ``i``: reduced in its own gradient array over ``comm``."""

    def __init__(self, layout: GradLayout, comm, wire: str, half_scaling: str = "chunk",
                 wire_ranks: int | None = None):
        super().__init__(layout, [(s.offset, s.offset + s.size) for s in layout.slots])
        self.comm = comm.Dup()  # private: buckets may run on a worker thread
        self.size = comm.Get_size()
        self.wire = self.wire_label = wire
        self.low_precision = wire != "float32"
        # study option: the 16-bit wire divides by wire_ranks instead of size, rescaled after
        self._n_wire = check_wire_ranks(wire_ranks) or self.size
        chunked = wire == "float16" and check_half_scaling(half_scaling) == "chunk"
        self._scaled = ScaledHalfAllreduce(self.comm) if chunked else None
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
        n_wire = self._n_wire
        if self._scaled is not None:
            with tracer.span("allreduce", **info), collective("allreduce", param=name):
                return self._scaled(ArraySource(g, 1.0 / n_wire, n_wire / size))
        buf = np.empty(g.size, wire_kernels.wire_storage_dtype(wire))
        with tracer.span("pack", **info):
            wire_kernels.pack_into(g, buf, 1.0 / n_wire, wire)
        with tracer.span("allreduce", **info), collective("allreduce", param=name):
            if self._lowp is not None:
                self._lowp(buf)
            elif size > 1:
                self.comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
        with tracer.span("unpack", **info):
            return wire_kernels.unpack_from(buf, g, n_wire / size, wire)

    def free(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


class NaiveCommunicator(ReducingCommunicator):
    """Per-parameter MPI allreduce over all ranks (CPU)."""

    DEFAULT_WIRE = ("float32", "float32")

    def bucket_algorithm(self, layout: GradLayout) -> PerParameterAlgorithm:
        if layout.gpu:
            raise ValueError("the 'naive' communicator reduces NumPy gradients; for CuPy use 'nccl' "
                             "or 'hierarchical'")
        return PerParameterAlgorithm(layout, self._mpi_comm, self.single_wire(), **self.half_wire_options())
