"""Bucketed gradient reduction: the engine under ``flat`` and ``hierarchical``.

The flat gradient layout (:class:`~hpcsgd.comm.packing.GradLayout`, sorted
parameter names) is cut into buckets of ``bucket_bytes`` of wire data. A
:class:`BucketAlgorithm` reduces one bucket: pack (scale by ``1/size`` and
cast), reduce, unpack (cast back, count non-finite values). Small buckets keep
the packed data in cache between the three passes and keep MPI in its fast
message-size range (4.5 GB/s for 256 KB-8 MB here, 1.7 GB/s from 32 MB up).

Bucket API (for backward/communication overlap, issue 7)::

    reducer = comm.bucket_reducer(model, zero_fill=True, threaded=True)   # collective
    reducer.bind(model)          # this step's gradients (after backward made them)
    for i in range(reducer.n_buckets):
        ...                      # once every param of reducer.bucket_params(i) has its grad:
        reducer.start(i)         # non-blocking when threaded
    bad = reducer.wait_all()     # or reducer.wait(i); raises like multi_node_mean_grad
                                 # (only wait_all raises NonFiniteGradientError)

* Buckets must be started in index order, by every rank (they are collectives).
* ``threaded=True`` runs buckets on one worker thread in start order (numba
  kernels release the GIL, mpi4py releases it in MPI calls), so Python can keep
  computing while a bucket is in flight; ``threaded=False`` runs ``start(i)``
  inline. The gradients of a started bucket must not change until it is waited.
* ``bind`` must be called each step after backward (Chainer replaces the grad
  arrays in every backward), before the first ``start``.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod

from hpcsgd.comm.packing import BoundGrads, GradLayout, select_params
from hpcsgd.errors import GradientOverflowError, NonFiniteGradientError


class BucketAlgorithm(ABC):
    """Reduces bucket ``i`` of a fixed layout. Subclasses: flat (MPI), hierarchical (shm + MPI)."""

    #: True when gradients cross some link in a 16-bit format (non-finite -> overflow error)
    low_precision: bool = False

    def __init__(self, layout: GradLayout, ranges: list[tuple[int, int]]):
        self.layout = layout
        self.ranges = ranges
        self.grads: BoundGrads | None = None

    def bind(self, grads: BoundGrads) -> None:
        self.grads = grads

    @abstractmethod
    def run(self, i: int) -> int:
        """Reduce bucket ``i`` into the bound gradients; return its non-finite count (same on all ranks)."""

    def free(self) -> None:
        """Release buffers/windows (collective when they are shared). Nothing to release here."""
        return None


def raise_if_nonfinite(bad: int, low_precision: bool, wire: str) -> None:
    """Raise the divergence error for ``bad`` non-finite averaged gradient elements."""
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


class BucketReducer:
    """Runs the buckets of one :class:`BucketAlgorithm`, inline or on a worker thread."""

    def __init__(self, algorithm: BucketAlgorithm, wire_label: str, threaded: bool = False):
        self.algorithm = algorithm
        self.wire_label = wire_label
        self.threaded = threaded
        self._bad = [0] * self.n_buckets
        self._done = [threading.Event() for _ in range(self.n_buckets)]
        self._errors: list[BaseException] = []
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._next = 0
        self.zero_fill = True

    @property
    def n_buckets(self) -> int:
        return len(self.algorithm.ranges)

    @property
    def layout(self) -> GradLayout:
        return self.algorithm.layout

    def bucket_params(self, i: int) -> list[str]:
        """Names of the parameters whose gradients bucket ``i`` reads and writes."""
        lo, hi = self.algorithm.ranges[i]
        return [self.layout.slots[k].name for k, _, _ in self.layout.pieces(lo, hi)]

    def bind(self, model_or_params, zero_fill: bool | None = None) -> None:
        """Attach this step's gradients (a link, or ``[(name, param)]`` in layout order)."""
        zf = self.zero_fill if zero_fill is None else zero_fill
        params = (select_params(model_or_params, zf) if hasattr(model_or_params, "namedparams")
                  else list(model_or_params))
        names = tuple(n for n, _ in params)
        if names != tuple(s.name for s in self.layout.slots):
            raise ValueError("BucketReducer.bind: the parameters differ from the reducer's layout; "
                             "build a new reducer")
        self.algorithm.bind(BoundGrads(self.layout, params))
        self._next = 0
        self._bad = [0] * self.n_buckets
        for ev in self._done:
            ev.clear()

    def _run(self, i: int) -> None:
        try:
            if not self._errors:
                self._bad[i] = self.algorithm.run(i)
        except BaseException as e:  # surfaced by wait()
            self._errors.append(e)
        finally:
            self._done[i].set()

    def _worker(self) -> None:
        while True:
            i = self._queue.get()
            if i is None:
                return
            self._run(i)

    def start(self, i: int) -> None:
        """Start bucket ``i`` (buckets go in index order, on every rank)."""
        if i != self._next:
            raise ValueError(f"BucketReducer.start({i}): buckets must start in order, expected {self._next}")
        self._next += 1
        if not self.threaded:
            self._run(i)
            return
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._worker, name="hpcsgd-buckets", daemon=True)
            self._thread.start()
        self._queue.put(i)

    def wait(self, i: int) -> None:
        """Block until bucket ``i`` is reduced and written back; re-raise a worker error."""
        self._done[i].wait()
        if self._errors:
            raise self._errors[0]

    def wait_all(self) -> int:
        """Start any bucket not yet started, wait for all, raise on non-finite means.

        Returns the (zero) non-finite count when ``check_finite`` is off upstream.
        """
        while self._next < self.n_buckets:
            self.start(self._next)
        for i in range(self.n_buckets):
            self._done[i].wait()
        if self._errors:
            err = self._errors[0]
            self._errors = []
            raise err
        return sum(self._bad)

    def close(self) -> None:
        """Stop the worker thread (buffers are freed by the communicator)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
