"""Scaled float16 for NCCL: one power-of-two exponent per bucket, the same on every rank.

Why not the CPU path's per-message scales (:mod:`hpcsgd.comm.fp16_reduce`): NCCL's
float16 allreduce stores every partial sum in float16 between hops, so a scale must
bound the *sum over all ranks*, not one rank's chunk, and it must be the same on every
rank (NCCL adds the ranks' float16 bits as they are). Why not ``grad / size`` (the
``'predivide'`` scheme): at 1024 ranks every ``|grad| < 0.06`` becomes a float16
subnormal and gradients below ``2^-25 * size`` round to 0 (docs/comm_algorithms.md).

The scheme (``half_scaling='chunk'`` on GPU, the default):

1. every rank takes the largest magnitude of each bucket of its float32 gradients, as
   the float32 bit pattern (:func:`absmax_bits`; as an unsigned integer the bits of a
   non-negative float order like the floats, and nan's bits lie above inf's);
2. one ``ncclAllReduce(MAX)`` of these ``uint32`` patterns, all buckets of the step in
   one call (an integer MAX keeps nan, which a float MAX may drop), one host read;
3. ``e = scale_exponent(m, size)`` from the global maximum ``m``: every rank computes it
   from the same bits with the same host code, so every rank gets the same ``e``;
4. pack ``float16(grad * 2^e)`` (no divide), ``ncclAllReduce(SUM)`` in float16, unpack
   ``float32(sum) * (2^-e / size)``.

Headroom: ``size * m * 2^e < 2^14`` (:data:`HEADROOM_BITS` below float16's ``[2^14, 2^15)``
top binade). In a chain of additions (a ring: each element's partial sum passes rank to
rank) a rounding moves a partial sum by at most the addend just added, so every
partial sum stays below ``2 * sum |addend| < 2^15 (1 + 2^-11)``, far from float16's
largest finite value 65504, in any ring order; a tree (NCCL's other algorithm) grows a
sum by at most ``(1 + 2^-11)`` per level. So no finite gradient can overflow.
Non-finite maxima give ``e = 0``: inf/nan travel unscaled, make the sum non-finite on
every rank alike and are counted at unpack, so ``check_finite`` skips the step in lock-step.

Cost: one tiny MAX allreduce (4 bytes per bucket) and one host sync per step, both
latency-bound; one extra read of the gradients for the maxima. bfloat16 has float32's
range and keeps ``grad / size``; float32 wires are not scaled.

Array-module generic (NumPy or CuPy) so that the arithmetic is tested on CPU with a
stand-in NCCL communicator (``tests/test_nccl_half_scale.py``). Units: exponents are
powers of two (int), maxima are float32 bit patterns (uint32).
"""

from __future__ import annotations

import math

import numpy as np

from hpcsgd.comm.fp16_reduce import check_half_scaling
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.runtime.watchdog import collective

#: ``size * m * 2^e`` lands in ``[2^(14 - HEADROOM_BITS), 2^(15 - HEADROOM_BITS))``
HEADROOM_BITS = 1
_TOP = 15 - HEADROOM_BITS
_INF_BITS = 0x7F800000
#: float32 can hold 2^e exactly for e in [-149, 127]
_E_MIN, _E_MAX = -149, 127


def uses_scale(wires, half_scaling: str) -> bool:
    """True when a float16 wire is among ``wires`` and ``half_scaling`` is ``'chunk'``."""
    return check_half_scaling(half_scaling) == "chunk" and "float16" in wires


def absmax_bits(x):
    """Bit pattern (0-d ``uint32`` of ``x``'s array module) of ``max |x|`` in float32.

    Monotone: the patterns of non-negative floats order like the floats, inf
    (0x7F800000) lies above every finite value and nan above inf. ``x`` is a
    contiguous 1-D array of any float dtype (cast to float32 first; rounding is
    monotone, so the cast of the maximum is the maximum of the casts).
    """
    x32 = x.astype(np.float32, copy=False)
    return (x32.view(np.uint32) & np.uint32(0x7FFFFFFF)).max()


def bucket_absmax_bits(grads, lo: int, hi: int):
    """:func:`absmax_bits` over flat range ``[lo, hi)`` of bound gradients (``BoundGrads``)."""
    m = None
    for i, a, b in grads.layout.pieces(lo, hi):
        p = absmax_bits(grads.piece(i, a, b))
        m = p if m is None else np.maximum(m, p)
    return m


def scale_exponent(bits: int, world: int) -> int:
    """Exponent ``e`` that puts ``world * m`` in ``[2^13, 2^14)``; ``m`` given by its float32 bits.

    The same as ``wire_kernels.half_exponent(world * m) - HEADROOM_BITS``, computed in
    float64 (``world * m`` cannot overflow float32 here), clamped so that ``2^e`` is an
    exact float32. Non-finite ``m`` (bits at or above inf's) and ``m = 0`` give 0.
    """
    bits = int(bits)
    if bits >= _INF_BITS or bits == 0:
        return 0
    m = float(np.uint32(bits).view(np.float32))
    _, q = math.frexp(m * world)  # m * world in [2^(q-1), 2^q)
    return min(max(_TOP - q, _E_MIN), _E_MAX)


def pack_scale(e: int) -> np.float32:
    """``2^e`` as an exact float32: the factor before the float16 cast."""
    return np.ldexp(np.float32(1.0), e)


def unpack_scale(e: int, world: int) -> np.float32:
    """``2^-e / world`` rounded once to float32: the factor after the sum (the mean)."""
    return np.float32(math.ldexp(1.0, -e) / world)


def _handle(buf):
    """A CuPy array's device pointer; a NumPy array itself (what a stand-in communicator gets)."""
    return getattr(buf.data, "ptr", buf)


class NcclOps:
    """In-place ``ncclAllReduce`` calls on one communicator and stream (CuPy's binding).

    ``nccl`` is the module holding the constants (``cupy.cuda.nccl``); ``stream`` the
    CUDA stream pointer (0 for a stand-in).
    """

    def __init__(self, comm, nccl, stream: int = 0):
        self.comm, self.nccl, self.stream = comm, nccl, stream

    def allreduce(self, buf, dtype, op) -> None:
        h = _handle(buf)
        self.comm.allReduce(h, h, int(buf.size), dtype, op, self.stream)

    def reduce_scatter(self, buf, mine, dtype, op) -> None:
        """``mine`` (this rank's ``buf.size / ranks`` slice of ``buf``) = its reduction over ranks."""
        self.comm.reduceScatter(_handle(buf), _handle(mine), int(mine.size), dtype, op, self.stream)

    def all_gather(self, mine, buf, dtype) -> None:
        """Every rank's ``mine`` into its place in ``buf`` (rank order)."""
        self.comm.allGather(_handle(mine), _handle(buf), int(mine.size), dtype, self.stream)

    def max_bits(self, bits) -> None:
        """Elementwise MAX over ranks of ``uint32`` bit patterns (keeps nan, see :func:`absmax_bits`)."""
        self.allreduce(bits, self.nccl.NCCL_UINT32, self.nccl.NCCL_MAX)


def to_host(a) -> np.ndarray:
    """A device array's values on the host; a NumPy array as it is.

    ``cupy.asnumpy`` without a stream copies synchronously: on the current stream
    (CuPy 13), after the MAX allreduce enqueued there, so the host waits for it.
    """
    if not hasattr(a, "get"):
        return np.asarray(a)
    import cupy

    return cupy.asnumpy(a)


class WireScales:
    """Pack and unpack factors of each bucket: ``(1/size, 1)``, or ``(2^e, 2^-e/size)`` when scaled.

    ``begin_step`` (scaled only) computes every bucket's exponent of the step at once:
    the local maxima, one MAX allreduce per communicator in ``ops`` (the world, or the
    node then between nodes: the max of maxes), one host read inside the watchdog's
    ``collective`` (a hung NCCL call blocks there). It reads every bucket's gradients, so
    all of them must be ready when the first bucket runs (true while overlap and double
    buffering are rejected on GPU); ``xp``: the array module of the gradients.
    """

    def __init__(self, ranges, world: int, scaled: bool, xp=np):
        self.ranges, self.world, self.scaled, self.xp = list(ranges), int(world), bool(scaled), xp
        self.bits = None
        self.exponents = [0] * len(self.ranges)

    def begin_step(self, grads, ops, name: str = "allreduce_half_scale") -> None:
        if not self.scaled:
            return
        if self.bits is None:  # allocated on the current device at the first step
            self.bits = self.xp.zeros(len(self.ranges), np.uint32)
        for i, (lo, hi) in enumerate(self.ranges):
            self.bits[i] = bucket_absmax_bits(grads, lo, hi)
        with get_tracer().span("allreduce_max", bytes=int(self.bits.nbytes), buckets=len(self.ranges)):
            for o in ops:
                o.max_bits(self.bits)
            with collective(name, buckets=len(self.ranges)):
                host = to_host(self.bits)
        self.exponents = [scale_exponent(b, self.world) for b in host]

    def factors(self, i: int) -> tuple[np.float32, np.float32]:
        """``(pack, unpack)`` factors of bucket ``i``."""
        if not self.scaled:
            return np.float32(1.0 / self.world), np.float32(1.0)
        e = self.exponents[i]
        return pack_scale(e), unpack_scale(e, self.world)


def nccl_mean_bucket(grads, lo: int, hi: int, buf, wire: str, factors, ops, dtype, bucket: int) -> int:
    """Bucket ``[lo, hi)`` of ``grads``: pack with ``factors[0]``, NCCL SUM, unpack with ``factors[1]``.

    The per-bucket body of ``NcclAllreduceAlgorithm`` (``buf``: the wire buffer, ``dtype``
    its NCCL type). Returns the unpack's non-finite count (0 on GPU, where it is added
    to a device counter).
    """
    info = {"bytes": int(buf.nbytes), "dtype": wire, "bucket": bucket}
    with get_tracer().span("pack", **info):
        grads.pack(lo, hi, buf, factors[0], wire)
    with get_tracer().span("allreduce", **info), collective("allreduce_nccl", bucket=bucket):
        ops.allreduce(buf, dtype, ops.nccl.NCCL_SUM)
    with get_tracer().span("unpack", **info):
        return grads.unpack(lo, hi, buf, factors[1], wire)
