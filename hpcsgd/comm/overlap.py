"""Gradient allreduce overlapped with backward: a bucket starts as soon as its grads are final.

Usage (what the multi-node optimizer does)::

    reducer = OverlappedReducer(comm, model)          # once
    model.cleargrads()
    loss = lossfun(model(x), t)
    with reducer:                                      # hook active during backward
        loss.backward()
    reducer.wait()                                     # grads := mean over ranks
    optimizer.update()

How it works:

* **Layout.** Parameters are laid out in one persistent float32 buffer in the
  order their gradients become final during backward, and cut into buckets of
  ``bucket_bytes``. The first pass uses reversed registration order; afterwards
  the layout is rebuilt once from the order observed on rank 0 (broadcast, so
  every rank has the same buckets), as PyTorch DDP does.
* **Readiness.** :class:`~hpcsgd.comm._grad_ready.GradReadyHook` reports each
  parameter's gradient the moment it is final (parameters used several times
  are counted). It is scaled by ``1/size`` and packed into its bucket at once.
* **Launch.** A bucket whose parameters are all packed is reduced (SUM of the
  pre-scaled values = mean). Buckets are launched strictly in index order, so
  every rank starts the same collectives in the same order even if readiness
  order differs. Whatever backward did not report (unused parameters, a missing
  hook) is packed from ``param.grad`` in :meth:`OverlappedReducer.wait`.
* **Progress** (``progress=``, see :mod:`hpcsgd.comm._engines`): ``'poll'``:
  ``MPI_Iallreduce`` per bucket, advanced by ``MPI_Testall`` after every function
  node's backward; ``'none'``: the same without polling (for MPICH's
  ``MPIR_CVAR_ASYNC_PROGRESS=1`` progress thread); ``'thread'``: a worker thread
  runs ``MPI_Allreduce`` per bucket; ``'comm'`` (what ``'auto'``, the default, picks
  for flat/hierarchical communicators): a worker thread runs the communicator's own
  bucket algorithm (hierarchical: shared memory in the node, float16 between nodes)
  in place in the gradients (gradients whose memory backward may still read are
  first copied into a persistent buffer, and ``param.grad`` becomes a view of it,
  valid until the next step's ``wait()``).
  All reductions run on a private clone of the communicator (``comm.split``), so
  they never interleave with the caller's collectives (e.g. synchronized BN).
* ``overlap=False`` keeps everything identical except that all buckets start in
  ``wait()``: the in-run baseline, bitwise equal for float32.

Double buffering (ChainerMN's one-step-stale gradients) needs the reduction of
step t to progress during step t+1's forward/backward:
:class:`BackgroundMeanGrad` (behind every ``MpiCommunicatorBase.multi_node_mean_grad_async``)
runs the communicator's own ``multi_node_mean_grad`` (same algorithm, same bits)
on a private clone of the communicator in a worker thread. :func:`mean_grad_async`
does the same with a reducer's buckets.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from hpcsgd.comm._engines import PROGRESS, AlgorithmBackend, BufferBackend, Layout
from hpcsgd.comm._grad_ready import GradReadyHook
from hpcsgd.comm.bucket_algorithm import raise_if_nonfinite
from hpcsgd.errors import ConfigError
from hpcsgd.trace import get_tracer
from hpcsgd.watchdog import collective

#: Default bucket size in bytes of float32 gradients; see docs/overlap.md for the measurement.
DEFAULT_BUCKET_BYTES = 4 << 20
#: Default progress engine: 'comm' for bucketed communicators (flat, hierarchical), else 'poll';
#: see docs/overlap.md for the measurement.
DEFAULT_PROGRESS = "auto"


def resolve_progress(comm, progress: str = DEFAULT_PROGRESS) -> str:
    """The engine ``progress='auto'`` means for ``comm``: 'comm' if it has a bucket algorithm, else 'poll'."""
    if progress != "auto":
        return progress
    return "comm" if hasattr(comm, "_new_algorithm") else "poll"


class OverlappedReducer:
    """Averages a model's gradients over ranks, overlapping the allreduce with backward.

    Args:
        comm: an hpcsgd communicator (MpiCommunicatorBase subclass).
        model: the chainer.Link whose parameters' grads are averaged.
        bucket_bytes: float32 bytes per bucket (default :data:`DEFAULT_BUCKET_BYTES`).
        progress: 'auto' (default, :func:`resolve_progress`), 'poll', 'none', 'thread' or 'comm'
            (see the module docstring).
        zero_fill: a parameter with data but no grad joins with zeros and gets the mean
            (ChainerMN's ``zero_fill=True``); False leaves its grad None (all ranks must agree).
        overlap: False starts every bucket in ``wait()`` (baseline for measurements).
        rebuild_order: rebuild the buckets once from the observed readiness order.
    """

    def __init__(self, comm, model, bucket_bytes: int | None = None, progress: str = DEFAULT_PROGRESS,
                 zero_fill: bool = True, overlap: bool = True, rebuild_order: bool = True) -> None:
        progress = resolve_progress(comm, progress)
        if progress not in PROGRESS:
            raise ConfigError(f"progress must be 'auto' or one of {PROGRESS}, got {progress!r}")
        bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        if isinstance(bucket_bytes, bool) or int(bucket_bytes) <= 0:
            raise ConfigError(f"bucket_bytes must be a positive number of bytes, got {bucket_bytes!r}")
        self.comm = comm
        self.model = model
        self.bucket_bytes = int(bucket_bytes)
        self.zero_fill = zero_fill
        self.overlap = overlap
        self.progress = progress
        self._rebuild_pending = rebuild_order
        self._private = comm.split(0, comm.rank)  # own MPI communicators for reductions in flight
        self._signature = None
        self._backend = None
        self._hook: GradReadyHook | None = None
        self._reset_step()
        self.stats: dict[str, Any] = {}

    # -- layout ---------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {n: p for n, p in self.model.namedparams() if p.array is not None}

    def _prepare(self) -> None:
        """Check the parameter set across ranks; (re)build the layout when it changed."""
        sig = tuple((n, tuple(p.shape), p.dtype.str) for n, p in self._params().items())
        if sig == self._signature:
            return
        self.comm.check_params_consistent(self.model, include_grad=False)
        params = self._params()
        self._set_layout(list(reversed(list(params))), params)  # reversed registration ~ backward order
        self._signature = sig

    def _set_layout(self, order: list[str], params: dict[str, Any]) -> None:
        if self._backend is not None:
            self._backend.close()
        layout = Layout(order, {n: int(params[n].size) for n in order}, self.bucket_bytes)
        if self.progress == "comm":
            self._backend = AlgorithmBackend(self._private, layout, params)
        else:
            self._backend = BufferBackend(self._private, layout, self.progress)
        self._buckets_of: dict[str, list[int]] = {}
        for i, members in enumerate(self._backend.members):
            for name in members:
                self._buckets_of.setdefault(name, []).append(i)
        nodes = {params[n].node: n for n in order}
        self._hook = GradReadyHook(nodes, self._on_ready, self._backend.poll)

    def _rebuild_from_observed(self) -> None:
        """Adopt rank 0's observed readiness order (collective; between steps)."""
        self._rebuild_pending = False
        names = self._backend.layout.names
        order = self._ready_order + [n for n in names if n not in set(self._ready_order)]
        order = self.comm.bcast_obj(order if self.comm.rank == 0 else None)
        if sorted(order) == sorted(names) and order != names:
            self._set_layout(order, self._params())

    # -- one step -----------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._placed: set[str] = set()
        self._missing: set[str] = set()
        self._ready_order: list[str] = []
        self._bucket_left: list[int] = []
        self._next_launch = 0
        self._pack_seconds = 0.0
        self._active = False

    def start(self) -> None:
        """Begin a step: call before backward (``__enter__`` does)."""
        self._prepare()
        self._backend.finish()  # nothing of a previous step may still be in flight
        self._backend.begin()
        self._reset_step()
        self._bucket_left = [len(set(m)) for m in self._backend.members]
        self._hook.reset()
        self._active = True

    def __enter__(self) -> OverlappedReducer:
        self.start()
        if self.overlap:
            self._hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.overlap:
            self._hook.__exit__(*exc)

    def _on_ready(self, name: str, grad, owned: bool) -> None:
        if name not in self._placed:
            self._ready_order.append(name)
            self._place(name, grad, owned)

    def _place(self, name: str, grad, owned: bool) -> None:
        t0 = time.perf_counter()
        if grad is None:
            self._missing.add(name)
        self._backend.place(name, grad, owned)
        self._placed.add(name)
        self._pack_seconds += time.perf_counter() - t0
        for b in self._buckets_of[name]:
            self._bucket_left[b] -= 1
        if self.overlap or not self._active:
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Start every complete bucket from the next one in index order."""
        n = len(self._bucket_left)
        while self._next_launch < n and self._bucket_left[self._next_launch] == 0:
            self._backend.launch(self._next_launch)
            self._next_launch += 1

    def place_all_now(self) -> None:
        """Place every gradient from ``param.grad`` and launch all buckets (no hook needed)."""
        self._active = False
        params = self._params()
        for name in self._backend.layout.names:
            if name not in self._placed:  # after backward: nothing else reads param.grad
                self._place(name, params[name].grad, True)
        self._launch_ready()

    def wait(self) -> None:
        """Finish the step: place what backward did not report, reduce the rest, write the means.

        Raises NonFiniteGradientError (GradientOverflowError for a 16-bit wire) identically on
        every rank, after writing the grads back, when the comm's ``check_finite`` is on.
        """
        if not self._active and self._next_launch == 0:
            raise RuntimeError("OverlappedReducer.wait() without a started step (use `with reducer:`)")
        t_end = time.perf_counter()
        early = len(self._placed)
        if not self.zero_fill:
            self.comm.check_params_consistent(self.model, include_grad=True)
        self.place_all_now()
        tracer = get_tracer()
        with collective("overlap_wait", buckets=len(self._bucket_left)), tracer.span("allreduce"):
            self._backend.finish()
        skip = self._missing if not self.zero_fill else set()
        with tracer.span("unpack", bytes=4 * self._backend.layout.total, dtype="float32"):
            bad = self._backend.write_back(self._params(), skip)
        tracer.add("pack", self._pack_seconds)
        self.stats = {"early_params": early, "params": len(self._placed), "buckets": len(self._bucket_left),
                      "pack_s": self._pack_seconds, "wait_s": time.perf_counter() - t_end,
                      "overlapped_buckets": sum(1 for t in self._backend.launch_times if t < t_end)}
        self._active = False
        self._next_launch = 0
        if self._rebuild_pending and self.overlap:
            self._rebuild_from_observed()
        if bad and self.comm.get_config("check_finite"):
            raise_if_nonfinite(bad, self._backend.low_precision, self._backend.wire_label)

    def finalize(self) -> None:
        """Stop the worker thread and free the private communicator. Idempotent."""
        if self._private is not None:
            if self._backend is not None:
                self._backend.close()
            self._private.finalize()
            self._private = None


class _AsyncHandle:
    """Handle of :func:`mean_grad_async`: ``wait()`` writes the means back (raises like the sync call)."""

    def __init__(self, reducer: OverlappedReducer) -> None:
        self._reducer = reducer

    def test(self) -> bool:
        return self._reducer is None or self._reducer._backend.idle()

    def wait(self) -> None:
        reducer, self._reducer = self._reducer, None
        if reducer is not None:
            reducer.wait()


def mean_grad_async(reducer: OverlappedReducer) -> _AsyncHandle:
    """Start averaging all current grads of ``reducer.model`` at once.

    Use a reducer with ``progress='thread'`` or ``'comm'`` so the reduction proceeds while
    the caller computes. Returns a handle whose ``wait()`` writes the means into the grads.
    """
    reducer.start()
    reducer.place_all_now()
    return _AsyncHandle(reducer)


class _ThreadHandle:
    """Handle of one background ``multi_node_mean_grad``: ``wait()`` joins it and re-raises its error."""

    def __init__(self, thread: threading.Thread, box: dict) -> None:
        self._thread, self._box = thread, box

    def test(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        with collective("mean_grad_async_wait"):
            self._thread.join()
        err, self._box["error"] = self._box.get("error"), None
        if err is not None:
            raise err


class BackgroundMeanGrad:
    """Runs ``comm.multi_node_mean_grad`` on a private clone of ``comm`` in a worker thread.

    The clone (``comm.split(0, rank)``: same class, same config, its own MPI
    communicators) keeps the reduction in flight from ever interleaving with the
    caller's collectives on ``comm``. One reduction at a time: :meth:`start` first
    waits for the previous one. The model passed must not be touched until ``wait()``
    (double buffering passes a shadow copy).
    """

    def __init__(self, comm) -> None:
        self._clone = comm.split(0, comm.rank)
        self._last: _ThreadHandle | None = None

    def start(self, model, zero_fill: bool = False) -> _ThreadHandle:
        if self._last is not None:
            self._last.wait()
        box: dict = {}

        def run() -> None:
            try:
                self._clone.multi_node_mean_grad(model, zero_fill)
            except BaseException as e:  # re-raised by wait() on the caller's thread
                box["error"] = e

        thread = threading.Thread(target=run, name="hpcsgd-mean-grad-async", daemon=True)
        thread.start()
        self._last = _ThreadHandle(thread, box)
        return self._last

    def close(self) -> None:
        """Wait for the reduction in flight (its error is dropped) and free the clone."""
        if self._last is not None:
            self._last._thread.join()
            self._last = None
        if self._clone is not None:
            self._clone.finalize()
            self._clone = None
