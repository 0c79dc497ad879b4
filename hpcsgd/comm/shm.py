"""Node-local shared memory: one MPI-3 window, one segment per rank, readable by all.

:class:`SharedSegments` allocates ``MPI.Win.Allocate_shared`` on the node
communicator (``topology.intra_comm``): each rank owns a segment of ``count``
elements, and every rank of the node maps every segment as a NumPy array.
Ranks then read each other's data directly (``segments[s][a:b]``): no MPI
message, no bounce buffer.

Placement: node rank 0 allocates the whole window (MPICH otherwise packs the
segments back to back, so segment 1 of ResNet-50's 102,228,384-byte layout
started 416 bytes into a page), every segment starts at a multiple of
:data:`SEGMENT_ALIGN` (2 MiB: page- and cache-line-aligned in every rank's
mapping, huge-page-aligned where the kernel backs shared memory with huge
pages), and each owner writes its own segment first (first touch: on a
multi-socket node its pages come from the owner's memory), then a fence.

Synchronisation follows the MPI-3 unified memory model: the window is kept in a
passive-target epoch (``Lock_all``) for its lifetime, and :meth:`fence` is
``Win_sync`` + a node barrier + ``Win_sync``, which orders every store made
before the fence before every load made after it, on every rank of the node.
The barrier is a flag per rank (an epoch counter, one cache line each, after
the segments): a rank publishes its epoch, spins :data:`FENCE_SPIN_S`, then
polls with ``sched_yield`` for :data:`FENCE_YIELD_S`, then sleeps
:data:`FENCE_SLEEP_S` between polls. Why not ``MPI_Barrier``: MPICH spins for as
long as a peer is late, and a peer is late mostly when it is not running (its
CPU shared with another job); a spinning waiter then burns its own CPU share,
which a fair scheduler takes back from the rank's later work. A sleeping waiter
uses no CPU, but wakes 50-80 us late (timer slack), and with 2 MiB buckets the
ranks meet about 100 times per call; a yielding waiter hands its CPU to whatever
else wants it and otherwise polls at once: 0.4-2.8 ms less per ResNet-50 gradient
mean than sleeping after the spin, in each of 6 launches on the AMD EPYC VM
(docs/comm_algorithms.md).
"""

from __future__ import annotations

import os
import time

import numba
import numpy as np
from mpi4py import MPI

from hpcsgd.runtime.watchdog import collective

#: bytes: segment starts are multiples of this from a base aligned in node rank 0's mapping
SEGMENT_ALIGN = 2 << 20
#: seconds a fence polls its peers' flags without sleeping
FENCE_SPIN_S = 50e-6
#: seconds a fence sleeps between polls once it has spun FENCE_SPIN_S
FENCE_SLEEP_S = 20e-6
#: seconds after FENCE_SPIN_S during which a fence yields its CPU between polls instead of sleeping
FENCE_YIELD_S = 2e-3
_FLAG_BYTES = 64  # one cache line per rank's epoch flag


class SharedSegments:
    """Per-rank segments of ``count`` elements of ``dtype`` in one shared window. Collective.

    Args:
        comm: a communicator whose ranks share memory (``Split_type(COMM_TYPE_SHARED)``
            or a split of it: virtual nodes work, they are inside one machine).
        count: elements per segment.
        dtype: NumPy dtype of the elements.
        align: bytes; segment starts are multiples of it (a multiple of the page size).
    """

    def __init__(self, comm, count: int, dtype=np.float32, align: int = SEGMENT_ALIGN):
        self.comm = comm
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        nbytes = self.count * self.dtype.itemsize
        #: bytes from one segment's start to the next
        self.stride = max(1, -(-nbytes // align)) * align
        flags_at = self.size * self.stride  # from the aligned base: the epoch flags
        total = flags_at + self.size * _FLAG_BYTES + align  # + slack to align the base
        with collective("shm_allocate", nbytes=total):
            self.win = MPI.Win.Allocate_shared(total if self.rank == 0 else 0, 1, comm=comm)
        mem, _ = self.win.Shared_query(0)
        raw = np.frombuffer(mem, dtype=np.uint8, count=total)
        # mappings differ between processes but not within a page: rank 0's offset fits all
        offset = comm.bcast((-raw.ctypes.data) % align if self.rank == 0 else None, root=0)
        self.segments: list[np.ndarray] = [
            raw[offset + s * self.stride:offset + s * self.stride + nbytes].view(self.dtype)
            for s in range(self.size)]
        flags = raw[offset + flags_at:offset + flags_at + self.size * _FLAG_BYTES].view(np.int64)
        self._flags = flags[::_FLAG_BYTES // 8]  # rank s's epoch: flags[s * 8]
        self._epoch = 0
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.mine[...] = 0  # first touch by the owner
        self._flags[self.rank] = 0
        self.win.Sync()
        with collective("shm_first_touch"):
            comm.Barrier()
        self.win.Sync()

    @property
    def mine(self) -> np.ndarray:
        """This rank's segment."""
        return self.segments[self.rank]

    def fence(self, name: str = "shm_fence", **info) -> None:
        """Make every rank's earlier stores visible to every rank's later loads. Collective.

        Publishes this rank's next epoch, then waits until every rank of the node has
        published it (spin, then sleep between polls; see the module docstring).
        """
        self.win.Sync()
        self._epoch += 1
        epoch, flags = self._epoch, self._flags
        flags[self.rank] = epoch
        if (flags < epoch).any():
            with collective(name, **info):
                t0 = time.perf_counter()
                while (flags < epoch).any():
                    waited = time.perf_counter() - t0
                    if waited > FENCE_SPIN_S + FENCE_YIELD_S:
                        time.sleep(FENCE_SLEEP_S)
                    elif waited > FENCE_SPIN_S:
                        os.sched_yield()
        self.win.Sync()

    def free(self) -> None:
        """Release the window (collective). The arrays in ``segments`` become invalid."""
        if self.win is not None:
            self.segments, self._flags = [], None
            self.win.Unlock_all()
            self.win.Free()
            self.win = None


#: round trips per pair in :func:`round_trip_ns` (about 0.1-0.5 ms per pair)
PROBE_ROUND_TRIPS = 1000
#: round trips of the first, short measurement of a pair, and the ns above which it ends there
#: (ranks sharing a CPU: every round trip waits for a time slice)
PROBE_FIRST, PROBE_SLOW_NS = 50, 5000.0
#: spins of one wait in the probe before it gives up (a peer that never answers: no hang)
_PROBE_SPIN_LIMIT = 200_000_000


@numba.njit(cache=True)
def _ping_pong(line, me, n, scratch, limit):  # pragma: no cover - numba
    """``n`` round trips of a counter in ``line[0]`` between the caller (me=0 pings, 1 pongs).

    Each wait also stores to ``line[scratch]`` (``scratch`` > 0, known only at run time) so
    that LLVM must reload ``line[0]`` every spin. Returns False if a wait exceeded ``limit``.
    """
    for i in range(n):
        if me == 0:
            line[0] = 2 * i + 1
            want = 2 * i + 2
        else:
            want = 2 * i + 1
        spins = 0
        while line[0] != want:
            line[scratch] = spins
            spins += 1
            if spins > limit:
                return False
        if me == 1:
            line[0] = 2 * i + 2
    return True


def round_trip_ns(comm, round_trips: int = PROBE_ROUND_TRIPS) -> float:
    """Slowest core-to-core round trip (ns) between node rank 0 and each other rank. Collective.

    Why: on a multi-chiplet CPU (AMD Zen: one L3 per CCD) two cores share a last-level
    cache or not, and on a VM the host decides that per launch. A cache line bouncing
    between the ranks' cores takes about 80-150 ns within one L3 and 400-500 ns across
    chiplets (measured on a 2-vCPU AMD EPYC Zen 5 VM; docs/comm_algorithms.md), which is
    what decides whether data handed from one rank to another through shared memory stays
    in cache. Returns ``inf`` if a peer did not answer (e.g. not running), 0 for one rank.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    if size < 2:
        return 0.0
    seg = SharedSegments(comm, 16, np.int64, align=4096)
    line = seg.segments[0]  # one cache line (64 bytes) of node rank 0's segment
    worst = 0.0
    try:
        for peer in range(1, size):
            role = 0 if rank == 0 else 1 if rank == peer else -1
            if role >= 0:
                _ping_pong(line, role, 2, 1 + role, _PROBE_SPIN_LIMIT)  # compile, warm the line
            dt = 0.0
            for n in (PROBE_FIRST, round_trips):  # a pair already slow after a few trips stops there
                if rank == 0:
                    line[0] = 0
                seg.fence("shm_probe")
                t0 = time.perf_counter()
                ok = True if role < 0 else _ping_pong(line, role, n, 1 + role, _PROBE_SPIN_LIMIT)
                dt = (time.perf_counter() - t0) / n * 1e9 if ok else float("inf")
                seg.fence("shm_probe")
                if comm.bcast(dt > PROBE_SLOW_NS, root=0):
                    break
            worst = max(worst, dt if rank == 0 else 0.0)
    finally:
        seg.free()
    return comm.bcast(worst, root=0)
