"""``dummy``: pack and unpack only, no communication (measures the packing cost).

Each bucket is packed to the wire format and unpacked again, with the same
kernels, buckets, tracing and non-finite check as ``flat``. The gradients stay
this rank's own (cast through the wire format), so this is *not* a mean: use it
only to time packing (ChainerMN's ``dummy`` communicator has the same role).
CuPy gradients take :class:`hpcsgd.comm.nccl.GpuPackOnlyAlgorithm` (the CUDA
kernels of the ``nccl`` path), as the CPU kernels here are numba's.
"""

from __future__ import annotations

import numpy as np

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.packing import GradLayout
from hpcsgd.comm.reducing import ReducingCommunicator
from hpcsgd.runtime.trace import get_tracer


def pack_unpack_bucket(grads, lo: int, hi: int, buf, wire: str, bucket: int) -> int:
    """Bucket ``[lo, hi)`` of ``grads`` packed into ``buf`` (``wire`` format, unscaled) and unpacked again.

    Why one function: ``dummy`` must time the same steps on NumPy gradients
    (:class:`DummyAlgorithm`, numba kernels) and on CuPy gradients
    (:class:`hpcsgd.comm.nccl.GpuPackOnlyAlgorithm`, CUDA kernels that only enqueue).
    ``buf``: the wire buffer, ``hi - lo`` elements. Returns the unpack's non-finite
    count (0 on GPU, where it is added to a device counter).
    """
    info = {"bytes": int(buf.nbytes), "dtype": wire, "bucket": bucket}
    with get_tracer().span("pack", **info):
        grads.pack(lo, hi, buf, 1.0, wire)
    with get_tracer().span("unpack", **info):
        return grads.unpack(lo, hi, buf, 1.0, wire)


class DummyAlgorithm(BucketAlgorithm):
    def __init__(self, layout: GradLayout, wire: str, bucket_bytes: int):
        super().__init__(layout, layout.bucket_ranges(bucket_bytes, wire_kernels.wire_itemsize(wire)))
        self.wire = self.wire_label = wire
        self.low_precision = wire != "float32"
        width = max((hi - lo for lo, hi in self.ranges), default=0)
        self.buf = np.empty(width, wire_kernels.wire_storage_dtype(wire))

    def run(self, i: int) -> int:
        lo, hi = self.ranges[i]
        return pack_unpack_bucket(self.grads, lo, hi, self.buf[: hi - lo], self.wire, i)


class DummyCommunicator(ReducingCommunicator):
    """Packs and unpacks the gradients without communicating (benchmarks only)."""

    def bucket_algorithm(self, layout: GradLayout) -> BucketAlgorithm:
        intra, inter = self.wire_formats()
        if layout.gpu:  # CuPy gradients: the NCCL path's CUDA pack/unpack kernels (numba takes no CuPy)
            from hpcsgd.comm import nccl

            return nccl.GpuPackOnlyAlgorithm(layout, intra, self.get_config("bucket_bytes"),
                                             nccl.current_device())
        return DummyAlgorithm(layout, intra, self.get_config("bucket_bytes"))
