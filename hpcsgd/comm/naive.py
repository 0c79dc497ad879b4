"""``naive``: one MPI Allreduce per parameter, no packing (ChainerMN's CPU baseline).

For each parameter in sorted-name order: float32 wire -> ``MPI_Allreduce(IN_PLACE,
SUM)`` on the gradient itself, then ``grad *= 1/size`` fused with the non-finite
count (one numba pass); float16 wire -> :class:`~hpcsgd.comm.fp16_reduce.ScaledHalfAllreduce`
on the gradient (a power-of-two scale per message); bfloat16 (or ``half_scaling='predivide'``)
-> cast ``grad/size`` to a 16-bit buffer,
:class:`~hpcsgd.comm.fp16_reduce.LowPrecisionAllreduce`, cast back. Useful as a
reference and for models with few, large parameters; ``flat``/``hierarchical``
are faster for many small ones.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import kernels
from hpcsgd.comm.bucketed import BucketedCommunicator
from hpcsgd.comm.buckets import raise_if_nonfinite
from hpcsgd.comm.fp16_reduce import ArraySource, LowPrecisionAllreduce, ScaledHalfAllreduce
from hpcsgd.comm.packing import flat_view, select_params
from hpcsgd.trace import get_tracer
from hpcsgd.watchdog import collective


class NaiveCommunicator(BucketedCommunicator):
    """Per-parameter MPI allreduce over all ranks (CPU)."""

    DEFAULT_WIRE = ("float32", "float32")

    def wire(self) -> str:
        intra, inter = self.wire_formats()
        return inter if self.inter_size > 1 else intra

    def _new_algorithm(self, layout):  # pragma: no cover - naive does not bucket
        raise NotImplementedError

    def multi_node_mean_grad(self, model, zero_fill: bool = False) -> None:
        params = select_params(model, zero_fill)
        if params and type(params[0][1].array).__module__.startswith("cupy"):
            raise ValueError("the 'naive' communicator reduces NumPy gradients; for CuPy use 'nccl' "
                             "or 'hierarchical'")
        self.check_params_consistent(model, include_grad=not zero_fill)
        wire, size = self.wire(), self.size
        tracer = get_tracer()
        opts = self.half_wire_options()
        n_wire = opts["wire_ranks"] or size
        chunked = wire == "float16" and opts["half_scaling"] == "chunk"
        scaled = ScaledHalfAllreduce(self._mpi_comm) if chunked else None
        lowp = LowPrecisionAllreduce(self._mpi_comm, wire) if wire != "float32" and size > 1 else None
        bad = 0
        for name, p in params:
            g = flat_view(p)
            info = {"bytes": int(g.size * kernels.wire_itemsize(wire)), "dtype": wire, "param": name}
            if wire == "float32" and g.dtype == np.float32:
                with tracer.span("allreduce", **info), collective("allreduce", param=name):
                    if size > 1:
                        self._mpi_comm.Allreduce(MPI.IN_PLACE, [g, MPI.FLOAT], op=MPI.SUM)
                with tracer.span("unpack", **info):
                    bad += kernels.scale_and_count(g, 1.0 / size)
                continue
            if scaled is not None:
                with tracer.span("allreduce", **info), collective("allreduce", param=name):
                    bad += scaled(ArraySource(g, 1.0 / n_wire, n_wire / size))
                continue
            buf = np.empty(g.size, kernels.wire_storage_dtype(wire))
            with tracer.span("pack", **info):
                kernels.pack_into(g, buf, 1.0 / n_wire, wire)
            with tracer.span("allreduce", **info), collective("allreduce", param=name):
                if lowp is not None:
                    lowp(buf)
                elif size > 1:
                    self._mpi_comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
            with tracer.span("unpack", **info):
                bad += kernels.unpack_from(buf, g, n_wire / size, wire)
        if self.get_config("check_finite"):
            raise_if_nonfinite(bad, wire != "float32", wire)
