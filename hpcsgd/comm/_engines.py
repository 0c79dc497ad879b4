"""Bucket backends of the overlapped reducer: where gradients go and how buckets make progress.

A backend owns the layout (parameters in reduction order, cut into buckets) and
reduces bucket ``i`` when the reducer launches it. Two kinds:

* :class:`BufferBackend`: gradients are scaled by ``1/size`` and packed into one
  float32 buffer as they become final; each bucket is one MPI allreduce of its
  slice. Progress:

  - ``'poll'``: ``MPI_Iallreduce`` per bucket; MPICH advances nonblocking
    collectives only inside MPI calls, so :meth:`BufferBackend.poll` (called by
    the backward hook after every function node) runs ``MPI_Testall``;
  - ``'none'``: the same without polling, for MPICH's progress thread
    (``MPIR_CVAR_ASYNC_PROGRESS=1`` in the environment before MPI starts);
  - ``'thread'``: a worker thread runs blocking ``MPI_Allreduce`` per bucket.

* :class:`AlgorithmBackend` (``'comm'``): the communicator's own bucket algorithm
  (:mod:`hpcsgd.comm.bucket_algorithm`: hierarchical shared memory + float16 between nodes,
  or flat) on a worker thread, in place: in the gradient array itself when it owns
  its memory (always after backward; during backward when the hook proves it), else
  in a copy inside one persistent flat buffer, of which ``param.grad`` becomes a view.

Worker threads need ``MPI_THREAD_MULTIPLE`` (mpi4py's default); NumPy/BLAS/numba
compute and MPI calls release the GIL, so backward and the reduction proceed together.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import wire_kernels
from hpcsgd.trace import get_tracer
from hpcsgd.watchdog import collective

BUFFER_PROGRESS = ("poll", "none", "thread")
PROGRESS = (*BUFFER_PROGRESS, "comm")


class Layout:
    """Parameters in reduction order, their element offsets, and buckets of whole parameters."""

    def __init__(self, names: list[str], sizes: dict[str, int], bucket_bytes: int) -> None:
        self.names = list(names)
        self.bucket_bytes = int(bucket_bytes)
        self.size = {n: int(sizes[n]) for n in self.names}
        self.offset: dict[str, int] = {}
        self.buckets: list[tuple[int, int, list[str]]] = []  # (start, stop) in elements, members
        limit = max(1, bucket_bytes // 4)
        start = pos = 0
        members: list[str] = []
        for name in self.names:
            self.offset[name] = pos
            members.append(name)
            pos += self.size[name]
            if pos - start >= limit:
                self.buckets.append((start, pos, members))
                start, members = pos, []
        if members:
            self.buckets.append((start, pos, members))
        self.total = pos


class _Worker:
    """One thread running ``fn(index)`` for launched buckets in launch order; errors go to wait()."""

    def __init__(self, fn: Callable[[int], None], name: str) -> None:
        self._fn = fn
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            index = self._queue.get()
            if index is None:
                return
            try:
                if self._error is None:
                    with collective("overlap_bucket", bucket=index):
                        self._fn(index)
            except BaseException as e:
                self._error = e
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def put(self, index: int) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put(index)

    def idle(self) -> bool:
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


class BufferBackend:
    """float32 pack buffer + one MPI allreduce per bucket ('poll', 'none' or 'thread')."""

    low_precision = False
    wire_label = "float32"

    def __init__(self, comm, layout: Layout, progress: str) -> None:
        if progress not in BUFFER_PROGRESS:
            raise ValueError(f"unknown progress {progress!r}; choose one of {PROGRESS}")
        self.comm, self.layout, self.progress = comm, layout, progress
        self.members = [m for _, _, m in layout.buckets]
        self.buffer = np.empty(layout.total, np.float32)
        self._scale = 1.0 / comm.size
        self._reqs: list = []
        self._worker = _Worker(self._allreduce, "hpcsgd-overlap") if progress == "thread" else None
        self.launch_times: list[float] = []

    def _slice(self, i: int) -> np.ndarray:
        start, stop, _ = self.layout.buckets[i]
        return self.buffer[start:stop]

    def _allreduce(self, i: int) -> None:
        buf = self._slice(i)
        t0 = time.perf_counter()
        self.comm.mpi_comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
        tracer = get_tracer()
        if tracer.recording:
            tracer.record("allreduce", t0, time.perf_counter(), tid="comm", bucket=i,
                          bytes=int(buf.nbytes), dtype="float32")

    def begin(self) -> None:
        self.launch_times = []

    def place(self, name: str, grad, owned: bool = False) -> None:
        off, n = self.layout.offset[name], self.layout.size[name]
        dst = self.buffer[off:off + n]
        if grad is None:
            dst[...] = 0.0
        elif type(grad).__module__.startswith("cupy"):
            dst[...] = grad.get().reshape(-1) * np.float32(self._scale)
        else:
            wire_kernels.pack_into(np.ascontiguousarray(grad).reshape(-1), dst, self._scale, "float32")

    def launch(self, i: int) -> None:
        self.launch_times.append(time.perf_counter())
        if self._worker is not None:
            self._worker.put(i)
        else:
            buf = self._slice(i)
            self._reqs.append(self.comm.mpi_comm.Iallreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM))

    def poll(self) -> None:
        if self.progress == "poll" and self._reqs and MPI.Request.Testall(self._reqs):
            self._reqs = []

    def idle(self) -> bool:
        return self._worker.idle() if self._worker is not None else not self._reqs

    def finish(self) -> None:
        if self._worker is not None:
            self._worker.wait()
        elif self._reqs:
            MPI.Request.Waitall(self._reqs)
            self._reqs = []

    def write_back(self, params: dict, skip: set) -> int:
        """Copy the means into ``param.grad`` (allocated if None); returns the non-finite count."""
        bad = 0
        for name in self.layout.names:
            if name in skip:
                continue
            p = params[name]
            off = self.layout.offset[name]
            src = self.buffer[off:off + p.size]
            if p.grad is None:
                p.grad = p.xp.zeros_like(p.array)
            if type(p.grad).__module__.startswith("cupy"):
                import cupy

                p.grad[...] = cupy.asarray(src.reshape(p.shape)).astype(p.grad.dtype)
                bad += int((~np.isfinite(src)).sum())
            elif p.grad.flags.c_contiguous and p.grad.flags.writeable:
                bad += wire_kernels.unpack_from(src, p.grad.reshape(-1), 1.0, "float32")
            else:  # e.g. a read-only broadcast view that backward handed over: replace it
                tmp = np.empty(p.size, p.array.dtype)
                bad += wire_kernels.unpack_from(src, tmp, 1.0, "float32")
                p.grad = tmp.reshape(p.shape)
        return bad

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
        else:
            self.finish()


class AlgorithmBackend:
    """The communicator's own :class:`~hpcsgd.comm.bucket_algorithm.BucketAlgorithm` on a worker thread ('comm').

    ``comm`` must be a private communicator (the reducer's clone) of a class with
    ``_new_algorithm(layout)`` (``flat``, ``hierarchical``). Buckets are that
    algorithm's ranges (a bucket may split a parameter).
    """

    def __init__(self, comm, layout: Layout, params: dict) -> None:
        from hpcsgd.comm.packing import BoundGrads, GradLayout

        if not hasattr(comm, "_new_algorithm"):
            raise ValueError(f"progress='comm' needs a bucketed communicator (flat, hierarchical), "
                             f"not {type(comm).__name__}")
        self.layout = layout
        glayout = GradLayout.from_named([(n, params[n]) for n in layout.names])
        comm.set_config("bucket_bytes", layout.bucket_bytes)
        self.algorithm = comm._new_algorithm(glayout)
        self.low_precision = self.algorithm.low_precision
        self.wire_label = comm._wire_label() if hasattr(comm, "_wire_label") else "float32"
        self.out = np.empty(layout.total, np.float32)

        class LiveGrads(BoundGrads):
            """Slot ``k`` is a view of ``out``, filled when backward finalises gradient ``k``."""

            def __init__(self) -> None:
                self.layout = glayout
                self.vectors = [None] * len(glayout)

        self.grads = LiveGrads()
        self.algorithm.bind(self.grads)
        self._slot = {s.name: k for k, s in enumerate(glayout.slots)}
        self.members = [[glayout.slots[k].name for k, _, _ in glayout.pieces(lo, hi)]
                        for lo, hi in self.algorithm.ranges]
        self._bad = [0] * len(self.members)
        self._inplace: dict = {}  # name -> gradient array reduced in place
        self._worker = _Worker(self._run, "hpcsgd-overlap-comm")
        self.launch_times: list[float] = []

    def _run(self, i: int) -> None:
        self._bad[i] = self.algorithm.run(i)

    def begin(self) -> None:
        self.launch_times = []
        self._bad = [0] * len(self.members)
        self._inplace = {}
        self.grads.vectors = [None] * len(self.grads.vectors)

    def place(self, name: str, grad, owned: bool = False) -> None:
        """Give the algorithm gradient ``name``; it reduces it in place.

        ``owned`` (nothing else in backward can read this memory, see ``_grad_ready``):
        the algorithm works in the gradient array itself, which becomes ``param.grad``.
        Otherwise (e.g. ``F.add`` handed the same ``gy`` to another input) it is first
        copied into its slot of the persistent buffer ``out``.
        """
        off, n = self.layout.offset[name], self.layout.size[name]
        if (owned and isinstance(grad, np.ndarray) and grad.dtype == np.float32
                and grad.flags.c_contiguous and grad.flags.writeable):
            self.grads.vectors[self._slot[name]] = grad.reshape(-1)
            self._inplace[name] = grad
            return
        self._inplace.pop(name, None)
        dst = self.out[off:off + n]
        if grad is None:
            dst[...] = 0.0
        elif type(grad).__module__.startswith("cupy"):
            dst[...] = grad.get().reshape(-1)
        else:
            wire_kernels.pack_into(np.ascontiguousarray(grad).reshape(-1), dst, 1.0, "float32")
        self.grads.vectors[self._slot[name]] = dst

    def launch(self, i: int) -> None:
        self.launch_times.append(time.perf_counter())
        self._worker.put(i)

    def poll(self) -> None:
        """Nothing to do: the worker thread makes progress."""

    def idle(self) -> bool:
        return self._worker.idle()

    def finish(self) -> None:
        self._worker.wait()

    def write_back(self, params: dict, skip: set) -> int:
        """Point every ``param.grad`` at its mean; returns the non-finite count.

        Gradients reduced in place already are ``param.grad``; the others become views
        of the persistent buffer ``out``.
        """
        for name in self.layout.names:
            if name in skip:
                continue
            p = params[name]
            done = self._inplace.get(name)
            if done is not None:
                if p.grad is not done:  # not expected: Chainer stored another array
                    p.grad = done
                continue
            off, n = self.layout.offset[name], self.layout.size[name]
            view = self.out[off:off + n].reshape(p.shape)
            p.grad = view if p.array.dtype == np.float32 else view.astype(p.array.dtype)
        return sum(self._bad)

    def close(self) -> None:
        self._worker.close()
        self.algorithm.free()

