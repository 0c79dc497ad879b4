"""The ``*_obj`` collectives of the MPI communicators: any picklable object, over mpi4py.

Why a mixin of its own: these seven methods are ChainerMN's object interface and
share nothing with the array and gradient paths of :class:`~hpcsgd.comm.mpi_base.
MpiCommunicatorBase` but the wrapped communicator. What they add to mpi4py's
lowercase collectives: each runs inside the collective watchdog, ``bcast_obj``
moves a large pickle in ``max_buf_len`` chunks (ChainerMN's argument; default 256
MiB per ``Bcast``), and a bad argument (an unpicklable object on the root, a
``scatter_obj`` list of the wrong length) raises on every rank instead of leaving
the others blocked.
"""

from __future__ import annotations

import pickle
from typing import Any

from mpi4py import MPI

from hpcsgd.runtime.watchdog import collective

_BCAST_OBJ_CHUNK = 256 * 1024 * 1024  # bytes per Bcast in bcast_obj (ChainerMN's max_buf_len)


class MpiObjectCollectives:
    """``send_obj`` ... ``allreduce_obj`` on ``self._mpi_comm``.

    The host class sets ``_mpi_comm`` and provides ``rank`` and ``size``.
    """

    def send_obj(self, obj: Any, dest: int, tag: int = 0) -> None:
        with collective("send_obj", dest=dest, tag=tag):
            self._mpi_comm.send(obj, dest=dest, tag=tag)

    def recv_obj(self, source: int, status=None, tag: int = MPI.ANY_TAG) -> Any:
        with collective("recv_obj", source=source, tag=tag):
            return self._mpi_comm.recv(source=source, status=status, tag=tag)

    def bcast_obj(self, obj: Any, max_buf_len: int | None = None, root: int = 0) -> Any:
        chunk = int(max_buf_len or _BCAST_OBJ_CHUNK)
        if chunk <= 0:
            raise ValueError(f"bcast_obj: max_buf_len must be positive, got {max_buf_len}")
        with collective("bcast_obj", root=root):
            if self.rank == root:
                try:
                    data, error = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), None
                except Exception as e:  # tell the other ranks before raising
                    data, error = b"", f"bcast_obj: object on rank {root} cannot be pickled: {e}"
                n, error = self._mpi_comm.bcast((len(data), error), root)
            else:
                n, error = self._mpi_comm.bcast(None, root)
                data = bytearray(n)
            if error:
                raise TypeError(error)
            view = memoryview(data)
            for off in range(0, n, chunk):
                self._mpi_comm.Bcast([view[off:off + chunk], MPI.BYTE], root)
        return obj if self.rank == root else pickle.loads(data)

    def gather_obj(self, obj: Any, root: int = 0):
        with collective("gather_obj", root=root):
            return self._mpi_comm.gather(obj, root=root)

    def allgather_obj(self, obj: Any) -> list:
        with collective("allgather_obj"):
            return self._mpi_comm.allgather(obj)

    def scatter_obj(self, objs: Any, root: int = 0) -> Any:
        with collective("scatter_obj", root=root):
            payload = None
            if self.rank == root:
                n = len(objs) if isinstance(objs, (list, tuple)) else None
                if n != self.size:
                    payload = [(f"scatter_obj: got {n} objects for {self.size} ranks", None)] * self.size
                else:
                    payload = [(None, o) for o in objs]
            error, out = self._mpi_comm.scatter(payload, root=root)
        if error:
            raise ValueError(f"{error} (on rank {root})")
        return out

    def allreduce_obj(self, obj: Any) -> Any:
        with collective("allreduce_obj"):
            return self._mpi_comm.allreduce(obj, op=MPI.SUM)
