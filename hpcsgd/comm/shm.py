"""Node-local shared memory: one MPI-3 window, one segment per rank, readable by all.

:class:`SharedSegments` allocates ``MPI.Win.Allocate_shared`` on the node
communicator (``topology.intra_comm``): each rank owns a segment of ``count``
elements, and every rank of the node maps every segment as a NumPy array.
Ranks then read each other's data directly (``segments[s][a:b]``): no MPI
message, no bounce buffer.

Synchronisation follows the MPI-3 unified memory model: the window is kept in a
passive-target epoch (``Lock_all``) for its lifetime, and :meth:`fence` is
``Win_sync`` + ``Barrier`` + ``Win_sync``, which orders every store made before
the fence before every load made after it, on every rank of the node.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsgd.runtime.watchdog import collective


class SharedSegments:
    """Per-rank segments of ``count`` elements of ``dtype`` in one shared window. Collective.

    Args:
        comm: a communicator whose ranks share memory (``Split_type(COMM_TYPE_SHARED)``
            or a split of it: virtual nodes work, they are inside one machine).
        count: elements per segment.
        dtype: NumPy dtype of the elements.
    """

    def __init__(self, comm, count: int, dtype=np.float32):
        self.comm = comm
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        nbytes = max(self.count * self.dtype.itemsize, self.dtype.itemsize)
        with collective("shm_allocate", nbytes=nbytes):
            self.win = MPI.Win.Allocate_shared(nbytes, self.dtype.itemsize, comm=comm)
        self.segments: list[np.ndarray] = []
        for s in range(self.size):
            mem, _ = self.win.Shared_query(s)
            self.segments.append(np.frombuffer(mem, dtype=self.dtype, count=self.count))
        self.win.Lock_all(MPI.MODE_NOCHECK)

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
