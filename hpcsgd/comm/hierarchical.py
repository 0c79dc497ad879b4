"""``hierarchical`` (the default): reduce-scatter in the node, allreduce between nodes, allgather.

CPU algorithm, per bucket ``[lo, hi)`` of the flat layout, with ``k`` ranks per
node and node-local rank ``r``; shard ``s`` is the ``s``-th of ``k`` near-equal
parts of the bucket, cut at multiples of 16 elements (64 bytes of float32,
:func:`~hpcsgd.comm.bucket_algorithm.shard_bounds`):

1. pack: rank ``r`` writes ``intra_wire(grad / size)`` of every shard *except*
   its own into its segment of a node-wide MPI-3 shared-memory window
   (:class:`~hpcsgd.comm.shm.SharedSegments`). Its own shard needs no copy;
2. fence (``Win_sync`` + node barrier);
3. reduce-scatter: rank ``r`` sums shard ``r`` straight out of the other ranks'
   segments plus its own gradients (float32 accumulation) into its segment;
4. inter-node allreduce of shard ``r`` among the ranks with the same
   ``intra_rank`` (``topology.inter_comm``): float16 on the wire by default
   (:class:`~hpcsgd.comm.fp16_reduce.ScaledHalfAllreduce`: a power-of-two
   scale per message, float32 accumulation; ``LowPrecisionAllreduce`` for
   bfloat16 or ``half_scaling='predivide'``), or ``MPI_Allreduce`` for float32;
5. fence;
6. allgather + unpack: every rank reads every shard from its owner's segment
   and writes its gradients, counting non-finite values in the same pass.

No MPI message carries intra-node data: peers read each other's segments
directly. Every shard is computed once, so all ranks get bitwise identical
gradients.

Staging ring: a rank's segment is not as long as the model but two *slots*, each
as long as the largest bucket, used in turn by consecutive buckets
(:data:`RING_SLOTS`; the count runs on across calls). Why: every byte staged in a
model-sized segment goes to DRAM and comes back, while a bucket-sized slot that
is reused stays in the shared L3 cache; with small buckets the node stage then
costs about what packing alone costs (docs/comm_algorithms.md has the numbers).
Why two: a slot region is written in step 1 (peers' shards) or step 3 (own
shard) and read by peers in step 3 or step 6 of the same bucket. A rank reaches
step 1 of bucket ``j + 2`` only after the first fence of bucket ``j + 1``, which
every peer enters only after its step 6 of bucket ``j``; so writes into the slot
of bucket ``j`` never overtake a peer's reads of it, and two fences per bucket
suffice. With one slot, bucket ``j + 1``'s step 1 could overwrite what a slow
peer still reads in step 6 of bucket ``j`` (tests/mpi/check_hier_ring.py shows it).

Defaults: float32 inside a node (shared memory moves bytes at memory speed;
casting costs more than the bytes saved), float16 between nodes. Nodes must
all have the same number of ranks; otherwise this communicator falls back to
the ``flat`` algorithm (with a warning), as the shards would not line up. With
one rank per node the node level is empty and the ``flat`` algorithm (in the
inter-node wire format) computes the same mean with fewer passes.
GPU gradients use NCCL (:mod:`hpcsgd.comm.nccl`) with the same fallback: unequal
nodes or one rank per node take one NCCL allreduce over all ranks.
"""

from __future__ import annotations

import warnings

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.bucket_algorithm import SHARD_ALIGN, BucketAlgorithm, shard_bounds
from hpcsgd.comm.flat import FlatAlgorithm
from hpcsgd.comm.fp16_reduce import (
    ArraySource,
    LowPrecisionAllreduce,
    ScaledHalfAllreduce,
    check_half_scaling,
    check_wire_ranks,
)
from hpcsgd.comm.packing import GradLayout
from hpcsgd.comm.reducing import ReducingCommunicator
from hpcsgd.comm.shm import SharedSegments, round_trip_ns
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.runtime.watchdog import collective

#: staging slots per rank, used in turn by consecutive buckets (two suffice; module docstring)
RING_SLOTS = 2


class HierarchicalAlgorithm(BucketAlgorithm):
    """Shared-memory reduce-scatter/allgather in the node, MPI between nodes (CPU)."""

    def __init__(self, layout: GradLayout, topology, intra_wire: str, inter_wire: str,
                 bucket_bytes: int, half_scaling: str = "chunk", wire_ranks: int | None = None):
        super().__init__(layout, layout.bucket_ranges(bucket_bytes, 4))
        self.size = topology.size
        self.k, self.r = topology.intra_size, topology.intra_rank
        self.intra_wire, self.inter_wire = intra_wire, inter_wire
        self.n_nodes = topology.inter_size
        self.low_precision = intra_wire != "float32" or (self.n_nodes > 1 and inter_wire != "float32")
        self.wire_label = intra_wire if intra_wire == inter_wire or self.n_nodes == 1 else \
            f"{intra_wire}/{inter_wire}"
        self.intra = topology.intra_comm.Dup()
        self.inter = topology.inter_comm.Dup() if self.n_nodes > 1 else None
        # two slots of the largest bucket (see the module docstring: staging ring)
        span = max((hi - lo // SHARD_ALIGN * SHARD_ALIGN for lo, hi in self.ranges), default=0)
        self._slot_len = -(-span // SHARD_ALIGN) * SHARD_ALIGN
        self._calls = 0  # buckets reduced so far: the slot of the next one is _calls % RING_SLOTS
        self.shm = SharedSegments(self.intra, RING_SLOTS * self._slot_len,
                                  wire_kernels.wire_storage_dtype(intra_wire))
        width = max((b - a for lo, hi in self.ranges for a, b in
                     (shard_bounds(lo, hi, self.k, s) for s in range(self.k))), default=0)
        self._acc = np.empty(width, np.float32)
        self._lowp = None
        # single node, float32: the owner writes its shard's sum straight into its grads
        self._direct = self.n_nodes == 1 and intra_wire == "float32"
        self._scaled = None
        # study option: the 16-bit stage sees values divided by wire_ranks instead of size
        n_wire = check_wire_ranks(wire_ranks) or self.size
        self._pre, self._post = self.size / n_wire, n_wire / self.size
        if self.inter is not None and inter_wire == "float16" and check_half_scaling(half_scaling) == "chunk":
            self._scaled = ScaledHalfAllreduce(self.inter)
        elif self.inter is not None and inter_wire != "float32":
            self._lowp = LowPrecisionAllreduce(self.inter, inter_wire)
            self._wire16 = np.empty(width, np.uint16)

    def _shard(self, lo: int, hi: int, s: int) -> tuple[int, int]:
        return shard_bounds(lo, hi, self.k, s)

    def _reduce_own(self, a: int, b: int, o: int) -> int:
        """Shard ``[a, b)``: own grads / size + the peers' packed values, into this rank's segment.

        Single node, float32: the sum also goes straight into this rank's gradients
        (one pass), and the non-finite count of the shard is returned; otherwise 0
        and the shard is unpacked with the others.
        """
        segs, r = self.shm.segments, self.r
        peers = [s for s in range(self.k) if s != r]
        scale = 1.0 / self.size
        f32 = self.intra_wire == "float32"
        acc = segs[r][a - o:b - o] if f32 else self._acc[: b - a]
        bad = 0
        for i, pa, pb in self.layout.pieces(a, b):
            g = self.grads.piece(i, pa, pb)
            out = acc[pa - a:pb - a]
            staged = [segs[s][pa - o:pb - o] for s in peers]
            if self._direct and g.dtype == np.float32:
                bad += wire_kernels.scaled_plus_into_both(g, scale, staged, out)
            elif f32:
                wire_kernels.scaled_plus(g, scale, staged, out)
                if self._direct:
                    bad += wire_kernels.unpack_from(out, g, 1.0, "float32")
            else:
                wire_kernels.scaled_plus(g, scale, [], out)
                for x in staged:
                    wire_kernels.accumulate(out, x, self.intra_wire)
        if self.inter is not None and b > a:
            with collective("allreduce_inter", nbytes=int(acc.nbytes)):
                if self._scaled is not None:  # non-finite sums are counted at unpack
                    self._scaled(ArraySource(acc, self._pre, self._post))
                elif self._lowp is not None:
                    w16 = self._wire16[: b - a]
                    wire_kernels.pack_into(acc, w16, self._pre, self.inter_wire)
                    self._lowp(w16)
                    wire_kernels.unpack_from(w16, acc, self._post, self.inter_wire)
                else:
                    self.inter.Allreduce(MPI.IN_PLACE, [acc, MPI.FLOAT], op=MPI.SUM)
        if not f32:
            wire_kernels.pack_into(acc, segs[r][a - o:b - o], 1.0, self.intra_wire)
        return bad

    def run(self, i: int) -> int:
        lo, hi = self.ranges[i]
        tracer = get_tracer()
        segs, mine = self.shm.segments, self.shm.mine
        slot = self._calls % RING_SLOTS
        self._calls += 1
        o = lo // SHARD_ALIGN * SHARD_ALIGN - slot * self._slot_len  # flat index - o = slot position
        info = {"bytes": int((hi - lo) * mine.itemsize), "dtype": self.intra_wire, "bucket": i}
        with tracer.span("pack", **info):
            for s in range(self.k):
                if s != self.r:
                    a, b = self._shard(lo, hi, s)
                    self.grads.pack(a, b, mine[a - o:b - o], 1.0 / self.size, self.intra_wire)
        with tracer.span("allreduce", inter_dtype=self.inter_wire, **info):
            self.shm.fence("allreduce_intra", bucket=i, stage="reduce_scatter")
            bad = self._reduce_own(*self._shard(lo, hi, self.r), o)
            self.shm.fence("allreduce_intra", bucket=i, stage="allgather")
        with tracer.span("unpack", **info):
            for s in range(self.k):
                if s != self.r or not self._direct:
                    a, b = self._shard(lo, hi, s)
                    bad += self.grads.unpack(a, b, segs[s][a - o:b - o], 1.0, self.intra_wire)
        return bad

    def free(self) -> None:
        if self.shm is not None:
            self.shm.free()
            self.shm = None
            self.intra.Free()
            if self.inter is not None:
                self.inter.Free()


class HierarchicalCommunicator(ReducingCommunicator):
    """Two-level allreduce: shared memory inside a node, MPI (float16 by default) between nodes."""

    DEFAULT_WIRE = ("float32", "float16")
    #: ``allreduce_grad_dtype`` (and so ``hpcsgd train``'s ``wire_dtype``) sets the wire
    #: between nodes only. Why: the node stage sums in shared memory, where halving the
    #: bytes gains little, and a 16-bit node stage casts ``grad / size`` without a scale,
    #: which flushes small gradients at 1024+ ranks. ``intra_dtype`` still selects it.
    GRAD_DTYPE_LEVELS = ("inter_dtype",)
    #: shared-memory buckets are fenced twice each: fewer, larger buckets (MPI messages
    #: between nodes are bucket / ranks-per-node, still in MPI's fast range)
    CONFIG_DEFAULTS = {**ReducingCommunicator.CONFIG_DEFAULTS, "bucket_bytes": 16 << 20}
    #: bucket size on one node whose ranks' cores share a last-level cache (see below)
    NEAR_BUCKET_BYTES = 2 << 20
    #: ns: a core-to-core round trip below this means a shared last-level cache
    NEAR_ROUND_TRIP_NS = 250.0

    def set_config(self, name, value=True, **kwargs):
        super().set_config(name, value, **kwargs)
        if name == "bucket_bytes":
            object.__setattr__(self, "_bucket_bytes_set", True)

    def node_bucket_bytes(self) -> int:
        """Bucket size of the CPU node stage on one node: the user's, else chosen by a probe. Collective.

        Why a probe: the staging slots of the node stage are handed from core to core.
        When the ranks' cores share a last-level cache (round trip < NEAR_ROUND_TRIP_NS),
        2 MiB buckets keep the slots in that cache and beat 16 MiB; when they do not
        (another chiplet's L3, or a VM whose host placed the vCPUs apart), small slots
        bounce between caches and 16 MiB buckets, staged through DRAM, are faster. On a
        2-vCPU AMD EPYC VM the host chose either placement per launch, which made the
        old fixed 16 MiB bimodal (docs/comm_algorithms.md, "One node, launch to launch").
        An explicit ``bucket_bytes`` is always used as given; jobs on several nodes keep
        16 MiB (the messages between nodes are bucket / ranks-per-node).
        """
        if getattr(self, "_bucket_bytes_set", False) or self.topology.inter_size > 1:
            return self.get_config("bucket_bytes")
        rt = round_trip_ns(self.topology.intra_comm)
        object.__setattr__(self, "node_round_trip_ns", rt)
        return self.NEAR_BUCKET_BYTES if rt < self.NEAR_ROUND_TRIP_NS else self.get_config("bucket_bytes")

    def bucket_algorithm(self, layout: GradLayout) -> BucketAlgorithm:
        intra, inter = self.wire_formats()
        topo = self.topology
        wire = inter if topo.inter_size > 1 else intra
        if not topo.uniform:
            if not getattr(self, "_warned_uniform", False):
                warnings.warn("hierarchical: nodes have different numbers of ranks; falling back to "
                              "the flat algorithm over all ranks", RuntimeWarning, stacklevel=3)
                self._warned_uniform = True
        # unequal nodes (shards would not line up) or one rank per node (the node level is
        # empty): one allreduce over all ranks computes the same mean
        flat = not topo.uniform or topo.intra_size == 1
        if layout.gpu:
            from hpcsgd.comm import nccl

            bucket_bytes, device = self.get_config("bucket_bytes"), nccl.current_device()
            scaling = self.get_config("half_scaling")
            if flat:
                return nccl.NcclAllreduceAlgorithm(layout, self._mpi_comm, wire, bucket_bytes, device,
                                                   half_scaling=scaling)
            return nccl.GpuHierarchicalAlgorithm(layout, topo, intra, inter, bucket_bytes, device,
                                                 half_scaling=scaling)
        if flat:
            return FlatAlgorithm(layout, self._mpi_comm, wire, self.get_config("bucket_bytes"),
                                 **self.half_wire_options())
        return HierarchicalAlgorithm(layout, topo, intra, inter, self.node_bucket_bytes(),
                                     **self.half_wire_options())
