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
``Win_sync`` + ``Barrier`` + ``Win_sync``, which orders every store made before
the fence before every load made after it, on every rank of the node.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsgd.runtime.watchdog import collective

#: bytes: segment starts are multiples of this from a base aligned in node rank 0's mapping
SEGMENT_ALIGN = 2 << 20


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
        total = self.size * self.stride + align  # + slack to align the base
        with collective("shm_allocate", nbytes=total):
            self.win = MPI.Win.Allocate_shared(total if self.rank == 0 else 0, 1, comm=comm)
        mem, _ = self.win.Shared_query(0)
        raw = np.frombuffer(mem, dtype=np.uint8, count=total)
        # mappings differ between processes but not within a page: rank 0's offset fits all
        offset = comm.bcast((-raw.ctypes.data) % align if self.rank == 0 else None, root=0)
        self.segments: list[np.ndarray] = [
            raw[offset + s * self.stride:offset + s * self.stride + nbytes].view(self.dtype)
            for s in range(self.size)]
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.mine[...] = 0  # first touch by the owner
        self.fence("shm_first_touch")

    @property
    def mine(self) -> np.ndarray:
        """This rank's segment."""
        return self.segments[self.rank]

    def fence(self, name: str = "shm_fence", **info) -> None:
        """Make every rank's earlier stores visible to every rank's later loads. Collective."""
        self.win.Sync()
        with collective(name, **info):
            self.comm.Barrier()
        self.win.Sync()

    def free(self) -> None:
        """Release the window (collective). The arrays in ``segments`` become invalid."""
        if self.win is not None:
            self.segments = []
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
