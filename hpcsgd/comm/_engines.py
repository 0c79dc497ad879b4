"""How an overlapped bucket reduction makes progress while Python computes.

Each engine reduces float32 buckets (in place, ``MPI_SUM``) on a private
communicator, in the order they are launched:

* :class:`PollEngine` (``'poll'``): ``MPI_Iallreduce`` per bucket; MPICH advances
  nonblocking collectives only inside MPI calls, so :meth:`PollEngine.poll` (called
  by the backward hook after every function node) runs ``MPI_Testall``.
* ``'none'``: the same without polling, for runs with MPICH's progress thread
  (``MPIR_CVAR_ASYNC_PROGRESS=1`` in the environment before MPI starts).
* :class:`ThreadEngine` (``'thread'``): a worker thread runs the communicator's
  blocking bucket reduction; NumPy/BLAS/numba compute and MPI calls release the
  GIL, so both proceed. Needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default).
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
from mpi4py import MPI

from hpcsgd.trace import get_tracer
from hpcsgd.watchdog import collective

ENGINES = ("poll", "none", "thread")


class _Engine:
    """Common bookkeeping: launch times, completion times (perf_counter seconds)."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.launch_times: list[float] = []
        self.done_times: list[float] = []

    def launched_before(self, t: float) -> int:
        """How many buckets of the current step were launched before time ``t``."""
        return sum(1 for x in self.launch_times if x < t)

    def begin_step(self) -> None:
        """Forget the previous step's times (call when nothing is in flight)."""
        self.launch_times, self.done_times = [], []

    def close(self) -> None:
        self.wait()


class PollEngine(_Engine):
    """``MPI_Iallreduce`` per bucket, advanced by ``MPI_Testall`` from :meth:`poll`."""

    def __init__(self, comm, polling: bool = True) -> None:
        super().__init__(comm)
        self._polling = polling
        self._reqs: list = []
        self._bytes: list[int] = []

    def launch(self, index: int, buf: np.ndarray) -> None:
        self.launch_times.append(time.perf_counter())
        self._bytes.append(int(buf.nbytes))
        self._reqs.append(self.comm.mpi_comm.Iallreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM))

    def poll(self) -> None:
        if self._polling and self._reqs and MPI.Request.Testall(self._reqs):
            self._finish()

    def done(self) -> bool:
        return not self._reqs

    def wait(self) -> None:
        if self._reqs:
            with collective("overlap_iallreduce", buckets=len(self._reqs)):
                MPI.Request.Waitall(self._reqs)
            self._finish()

    def _finish(self) -> None:
        now = time.perf_counter()
        tracer = get_tracer()
        if tracer.recording:
            for i, (t0, nbytes) in enumerate(zip(self.launch_times, self._bytes)):
                tracer.record("allreduce", t0, now, tid="comm", bucket=i, bytes=nbytes, dtype="float32")
        self.done_times = [now] * len(self._reqs)
        self._reqs, self._bytes = [], []


class ThreadEngine(_Engine):
    """A worker thread that reduces the launched buckets one by one with a blocking call."""

    def __init__(self, comm) -> None:
        super().__init__(comm)
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hpcsgd-overlap", daemon=True)
        self._thread.start()

    def _reduce(self, buf: np.ndarray) -> None:
        self.comm.mpi_comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)

    def _run(self) -> None:
        tracer = get_tracer()
        while True:
            item = self._queue.get()
            if item is None:
                return
            index, buf = item
            t0 = time.perf_counter()
            try:
                if self._error is None:
                    with collective("overlap_bucket", bucket=index):
                        self._reduce(buf)
            except BaseException as e:  # reported by wait() on the main thread
                self._error = e
            t1 = time.perf_counter()
            if tracer.recording:
                tracer.record("allreduce", t0, t1, tid="comm", bucket=index, bytes=int(buf.nbytes),
                              dtype="float32")
            with self._cond:
                self.done_times.append(t1)
                self._pending -= 1
                self._cond.notify_all()

    def launch(self, index: int, buf: np.ndarray) -> None:
        with self._cond:
            self._pending += 1
            self.launch_times.append(time.perf_counter())
        self._queue.put((index, buf))

    def poll(self) -> None:
        """Nothing to do: the worker thread makes progress."""

    def done(self) -> bool:
        with self._cond:
            return self._pending == 0

    def wait(self) -> None:
        with self._cond:
            while self._pending:
                self._cond.wait()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._queue.put(None)
            self._thread.join()


def make_engine(kind: str, comm) -> _Engine:
    """Engine ``kind`` ('poll', 'none', 'thread') reducing on ``comm`` (an hpcsgd communicator)."""
    if kind == "poll":
        return PollEngine(comm)
    if kind == "none":
        return PollEngine(comm, polling=False)
    if kind == "thread":
        return ThreadEngine(comm)
    raise ValueError(f"unknown progress engine {kind!r}; choose one of {ENGINES}")
