"""The per-bucket algorithm interface every gradient-averaging communicator provides.

Like PyTorch DDP's split between its Reducer and a communication hook: the
engine (:class:`~hpcsgd.comm.reducer.GradReducer`) owns the flat layout, the
order, the buckets' readiness and the one worker thread; the communicator only
says how to reduce one bucket. A communicator provides it through::

    comm.bucket_algorithm(layout) -> BucketAlgorithm | None   # collective; None: no bucketed path

A :class:`BucketAlgorithm` is built for one :class:`~hpcsgd.comm.packing.GradLayout`
(parameters in a given order, on one device) and cuts ``[0, layout.total)`` into
``ranges`` (flat element ranges, in reduction order; a range may split a
parameter). ``run(i)`` reduces range ``i`` of the bound gradients in place:
pack (scale by ``1/size`` and cast to the wire format), reduce, unpack (cast back,
count non-finite values). Every rank calls ``run`` for the same ``i`` in the
same order (they are collectives). ``run`` may be called on the engine's worker
thread, so an algorithm communicates only over its own (duplicated) MPI/NCCL
communicators.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from hpcsgd.comm.packing import BoundGrads, GradLayout
from hpcsgd.errors import GradientOverflowError, NonFiniteGradientError


class BucketAlgorithm(ABC):
    """Reduces bucket ``i`` of a fixed layout in place (see the module docstring)."""

    #: True when gradients cross some link in a 16-bit format (non-finite -> overflow error)
    low_precision: bool = False
    #: wire format(s) for messages, e.g. ``'float32'`` or ``'float32/float16'`` (intra/inter)
    wire_label: str = "float32"

    def __init__(self, layout: GradLayout, ranges: list[tuple[int, int]]):
        self.layout = layout
        self.ranges = ranges
        self.grads: BoundGrads | None = None

    def bind(self, grads: BoundGrads) -> None:
        """Use ``grads`` (aligned with ``self.layout``); its ``vectors`` may change between runs."""
        self.grads = grads

    @abstractmethod
    def run(self, i: int) -> int:
        """Reduce bucket ``i`` into the bound gradients; return its non-finite count (same on all ranks)."""

    def free(self) -> None:
        """Release buffers/windows (collective when they are shared). Nothing to release here."""
        return None


#: shard cuts fall on multiples of this many elements (64 bytes of float32: one cache line)
SHARD_ALIGN = 16


def shard_bounds(lo: int, hi: int, k: int, s: int, align: int = SHARD_ALIGN) -> tuple[int, int]:
    """Elements ``[a, b)`` of shard ``s`` of ``k`` near-equal shards of the bucket ``[lo, hi)``.

    Why aligned: in the hierarchical algorithm each shard is written by a different
    rank; cutting at absolute flat indices that are multiples of ``align`` (16 float32
    elements = 64 bytes) keeps every cache line of a 64-byte-aligned segment within
    one owner's shard. Inner cuts are ``lo + (hi - lo) * s // k`` rounded down to a
    multiple of ``align`` (clamped to ``[lo, hi]``), so shards differ from equal by
    less than ``align`` elements, and a bucket smaller than ``align * k`` may leave
    some shards empty. Used by :mod:`hpcsgd.comm.hierarchical` and replayed by
    :mod:`hpcsgd.comm.fp16_model`: both must cut the same way.
    """

    def cut(j: int) -> int:
        if j <= 0:
            return lo
        if j >= k:
            return hi
        return min(hi, max(lo, (lo + (hi - lo) * j // k) // align * align))

    return cut(s), cut(s + 1)


def raise_if_nonfinite(bad: int, low_precision: bool, wire: str) -> None:
    """Raise the divergence error for ``bad`` non-finite averaged gradient elements (nothing if 0)."""
    if bad <= 0:
        return
    if low_precision:
        raise GradientOverflowError(
            f"gradients diverged: {bad} averaged gradient values are inf/nan after a {wire} "
            f"reduction (overflow of the 16-bit wire format, or non-finite local gradients); "
            f"the gradients were written back, skip this update", count=bad)
    raise NonFiniteGradientError(
        f"gradients diverged: {bad} averaged gradient values are inf/nan; the gradients were "
        f"written back, skip this update", count=bad)
