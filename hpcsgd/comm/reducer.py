"""``GradReducer``: the one gradient-reduction engine (layout + bucket algorithm + at most one thread).

One engine, three ways to drive it:

* **blocking** (``multi_node_mean_grad``): :meth:`GradReducer.bind` this step's
  gradients, :meth:`launch_all` runs every bucket inline, :meth:`wait` returns the
  non-finite count (identical on every rank);
* **double buffering** (``multi_node_mean_grad_async``): the same on a threaded
  engine, so :meth:`launch_all` returns at once and the caller computes meanwhile;
* **overlap during backward** (:class:`hpcsgd.comm.overlap.OverlappedReducer`):
  a threaded engine whose layout is in backward order; each gradient is
  :meth:`place`\\ d the moment backward finalises it and each bucket is
  :meth:`launch`\\ ed as soon as all its gradients are placed.

The communicator supplies only the per-bucket algorithm
(``comm.bucket_algorithm(layout)``, :mod:`hpcsgd.comm.bucket_algorithm`); the
engine reduces in place in the gradient arrays, or, for a gradient that backward
may still read (``owned=False``), in a copy inside one persistent float32 buffer
of which ``param.grad`` then becomes a view (:meth:`write_back`).

Threading: buckets run on one worker thread in launch order. NumPy/numba
kernels and MPI calls release the GIL (mpi4py's default ``MPI_THREAD_MULTIPLE``),
so Python keeps computing while a bucket is in flight. The worker makes the
gradients' CUDA device current when it starts (CUDA's current device is per
thread). The gradients of a launched bucket must not change until :meth:`wait`.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from hpcsgd.comm import wire_kernels
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.packing import LOCAL_SQ_NORM, BoundGrads, GradLayout, flat_view
from hpcsgd.errors import ConfigError
from hpcsgd.runtime.watchdog import collective


class _Worker:
    """One thread running ``fn(index)`` for launched buckets in launch order; errors go to wait()."""

    def __init__(self, fn, name: str, device: int | None) -> None:
        self._fn = fn
        self._device = device
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._device is not None:  # cudaSetDevice is per thread: use the gradients' device
            try:
                import cupy

                cupy.cuda.Device(self._device).use()
            except Exception as e:  # reported by the first wait()
                self._error = e
        while True:
            index = self._queue.get()
            if index is None:
                return
            try:
                if self._error is None:
                    with collective("reduce_bucket", bucket=index):
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


def _device_of(array) -> int | None:
    dev = getattr(array, "device", None)
    return getattr(dev, "id", None) if type(array).__module__.startswith("cupy") else None


class GradReducer:
    """Averages the gradients of one layout bucket by bucket (see the module docstring).

    Args:
        comm: a communicator with ``bucket_algorithm(layout)``; the algorithm is built
            now (collective) and reduces over that communicator's ranks.
        layout: the flat layout (order and device of the gradients).
        threaded: run buckets on one worker thread (started on the first launch).
    """

    def __init__(self, comm, layout: GradLayout, threaded: bool = False) -> None:
        algorithm = comm.bucket_algorithm(layout)
        if not isinstance(algorithm, BucketAlgorithm):
            raise ConfigError(f"{type(comm).__name__} has no bucket algorithm for this layout "
                              f"(bucket_algorithm returned {algorithm!r})")
        self.layout = layout
        self.algorithm = algorithm
        self.threaded = bool(threaded)
        self.grads = BoundGrads(layout)
        algorithm.bind(self.grads)
        self.n_buckets = len(algorithm.ranges)
        self.bucket_slots = [[k for k, _, _ in layout.pieces(lo, hi)] for lo, hi in algorithm.ranges]
        self._bad = [0] * self.n_buckets
        self._launched = 0
        self._out: np.ndarray | None = None  # staging buffer of gradients placed by copy
        self._inplace: dict[int, object] = {}  # slot -> gradient array reduced in place
        self._worker: _Worker | None = None
        self.launch_times: list[float] = []
        self._sq: float | None = None  # this step's local squared norm, while LOCAL_SQ_NORM is armed

    # -- reading ---------------------------------------------------------------------------
    @property
    def low_precision(self) -> bool:
        return self.algorithm.low_precision

    @property
    def wire_label(self) -> str:
        return self.algorithm.wire_label

    def bucket_params(self, i: int) -> list[str]:
        """Names of the parameters whose gradients bucket ``i`` reads and writes."""
        return [self.layout.slots[k].name for k in self.bucket_slots[i]]

    # -- filling ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Start a step: forget the previous step's gradients. Nothing may be in flight."""
        if self._launched and not self.idle():
            raise RuntimeError("GradReducer.begin: the previous step is still in flight; call wait() first")
        self._launched = 0
        self._bad = [0] * self.n_buckets
        self._inplace = {}
        self.grads.vectors[:] = [None] * len(self.layout)
        self.launch_times = []
        self._sq = 0.0 if LOCAL_SQ_NORM.armed() else None

    def bind(self, params: list) -> None:
        """Use ``[(name, param)]`` (layout order) as this step's gradients, reduced in place."""
        if tuple(n for n, _ in params) != tuple(s.name for s in self.layout.slots):
            raise ValueError("GradReducer.bind: the parameters differ from the reducer's layout")
        self.begin()
        self.grads.vectors[:] = [flat_view(p) for _, p in params]

    def place(self, k: int, grad, owned: bool) -> None:
        """Give slot ``k`` this step's gradient ``grad`` (None: zeros).

        ``owned`` (nothing else in backward can read this memory): the algorithm works
        in the array itself. Otherwise (e.g. ``F.add`` handed the same ``gy`` to another
        input) it is first copied into its slot of the persistent float32 buffer.
        """
        if (owned and isinstance(grad, np.ndarray) and grad.dtype == np.float32
                and grad.flags.c_contiguous and grad.flags.writeable):
            self.grads.vectors[k] = grad.reshape(-1)
            self._inplace[k] = grad
            return
        if self.layout.gpu:
            raise ConfigError("GradReducer.place: copied (overlapped) placement of CuPy gradients is not "
                              "supported; overlap is validated on CPU only")
        if self._out is None:
            self._out = np.empty(self.layout.total, np.float32)
        self._inplace.pop(k, None)
        s = self.layout.slots[k]
        dst = self._out[s.offset:s.offset + s.size]
        if grad is None:
            dst[...] = 0.0
        else:
            wire_kernels.pack_into(np.ascontiguousarray(grad).reshape(-1), dst, 1.0, "float32")
        self.grads.vectors[k] = dst

    # -- running ---------------------------------------------------------------------------
    def _run(self, i: int) -> None:
        if self._sq is not None:  # the local values, before the algorithm scales, casts or reduces them
            self._sq += self.grads.sq_norm(*self.algorithm.ranges[i])
        self._bad[i] = self.algorithm.run(i)

    def launch(self, i: int) -> None:
        """Reduce bucket ``i`` (inline, or queued to the worker). Buckets go in index order."""
        if i != self._launched:
            raise ValueError(f"GradReducer.launch({i}): buckets launch in order, expected {self._launched}")
        self._launched += 1
        self.launch_times.append(time.perf_counter())
        if not self.threaded:
            self._run(i)
            return
        if self._worker is None:
            device = next((_device_of(v) for v in self.grads.vectors if v is not None), None)
            self._worker = _Worker(self._run, "hpcsgd-grad-reducer", device)
        self._worker.put(i)

    def launch_all(self) -> None:
        """Launch every bucket not launched yet."""
        while self._launched < self.n_buckets:
            self.launch(self._launched)

    def idle(self) -> bool:
        """True when no launched bucket is still running."""
        return self._worker is None or self._worker.idle()

    def wait(self) -> int:
        """Wait for every launched bucket; returns the non-finite count (same on all ranks).

        Re-raises an error of the worker thread. When every bucket ran and
        ``LOCAL_SQ_NORM`` was armed at :meth:`begin`, publishes the step's local squared norm.
        """
        if self._worker is not None:
            self._worker.wait()
        if self._sq is not None and self._launched == self.n_buckets:  # once per step, when complete
            LOCAL_SQ_NORM.publish(self._sq)
            self._sq = None
        return sum(self._bad)

    def write_back(self, params: dict, skip=()) -> None:
        """After :meth:`wait` of placed gradients: point ``param.grad`` at each mean.

        Gradients reduced in place already are ``param.grad``; copied ones become views of
        the persistent buffer (valid until the next step's reduction), cast for non-float32
        parameters. Names in ``skip`` are left alone.
        """
        for k, s in enumerate(self.layout.slots):
            if s.name in skip:
                continue
            p = params[s.name]
            done = self._inplace.get(k)
            if done is not None:
                if p.grad is not done:  # not expected: Chainer stored another array
                    p.grad = done
                continue
            view = self._out[s.offset:s.offset + s.size].reshape(s.shape)
            p.grad = view if p.array.dtype == np.float32 else view.astype(p.array.dtype)

    def close(self) -> None:
        """Stop the worker thread and free the algorithm's buffers (collective). Idempotent."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.close()
        if self.algorithm is not None:
            algorithm, self.algorithm = self.algorithm, None
            algorithm.free()
