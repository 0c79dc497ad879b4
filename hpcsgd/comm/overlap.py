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
* **Progress** (``progress=``): ``'poll'``: ``MPI_Iallreduce`` per bucket,
  advanced by ``MPI_Testall`` after every function node's backward; ``'none'``:
  the same without polling (for MPICH's ``MPIR_CVAR_ASYNC_PROGRESS=1`` progress
  thread); ``'thread'``: a worker thread runs the blocking reduction of each
  bucket in order (``MPI_Allreduce``). All reductions run on a private
  duplicate of the communicator, so they never interleave with the caller's
  collectives (e.g. synchronized BN during backward).
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

import numpy as np

from hpcsgd.comm import kernels
from hpcsgd.comm._engines import ENGINES, make_engine
from hpcsgd.comm._grad_ready import GradReadyHook
from hpcsgd.errors import ConfigError, NonFiniteGradientError
from hpcsgd.trace import get_tracer
from hpcsgd.watchdog import collective

#: Default bucket size in bytes of float32 gradients; see docs/overlap.md for the measurement.
DEFAULT_BUCKET_BYTES = 4 << 20
#: Default progress engine; see docs/overlap.md for the measurement.
DEFAULT_PROGRESS = "poll"


class _Layout:
    """Parameters in reduction order, their offsets in the flat buffer, and the buckets."""

    def __init__(self, names: list[str], sizes: dict[str, int], bucket_bytes: int) -> None:
        self.names = list(names)
        self.offset: dict[str, int] = {}
        self.size = {n: int(sizes[n]) for n in self.names}
        self.bucket_of: dict[str, int] = {}
        self.buckets: list[tuple[int, int, list[str]]] = []  # (start, stop) elements, members
        limit = max(1, bucket_bytes // 4)
        start = pos = 0
        members: list[str] = []
        for name in self.names:
            self.offset[name] = pos
            self.bucket_of[name] = len(self.buckets)
            members.append(name)
            pos += sizes[name]
            if pos - start >= limit:
                self.buckets.append((start, pos, members))
                start, members = pos, []
        if members:
            self.buckets.append((start, pos, members))
        self.total = pos


class OverlappedReducer:
    """Averages a model's gradients over ranks, overlapping the allreduce with backward.

    Args:
        comm: an hpcsgd communicator (MpiCommunicatorBase subclass).
        model: the chainer.Link whose parameters' grads are averaged.
        bucket_bytes: float32 bytes per bucket (default: comm's ``bucket_bytes`` config
            if set by the user, else :data:`DEFAULT_BUCKET_BYTES`).
        progress: 'poll', 'none' or 'thread' (see the module docstring).
        zero_fill: a parameter with data but no grad joins with zeros and gets the mean
            (ChainerMN's ``zero_fill=True``); False leaves its grad None (all ranks must agree).
        overlap: False starts every bucket in ``wait()`` (baseline for measurements).
        rebuild_order: rebuild the buckets once from the observed readiness order.
    """

    def __init__(self, comm, model, bucket_bytes: int | None = None, progress: str = DEFAULT_PROGRESS,
                 zero_fill: bool = True, overlap: bool = True, rebuild_order: bool = True) -> None:
        if progress not in ENGINES:
            raise ConfigError(f"progress must be one of {ENGINES}, got {progress!r}")
        if bucket_bytes is None:
            bucket_bytes = DEFAULT_BUCKET_BYTES
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
        self._engine = make_engine(progress, self._private)
        self._signature = None
        self._layout: _Layout | None = None
        self._buffer = np.empty(0, np.float32)
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
        order = list(reversed(list(params)))  # registration order reversed ~ backward order
        self._set_layout(order, params)
        self._signature = sig

    def _set_layout(self, order: list[str], params: dict[str, Any]) -> None:
        self._layout = _Layout(order, {n: int(params[n].size) for n in order}, self.bucket_bytes)
        if self._buffer.size != self._layout.total:
            self._buffer = np.empty(self._layout.total, np.float32)
        nodes = {params[n].node: n for n in order}
        self._hook = GradReadyHook(nodes, self._on_ready, self._engine.poll)

    def _rebuild_from_observed(self) -> None:
        """Adopt rank 0's observed readiness order (collective; between steps)."""
        self._rebuild_pending = False
        seen = list(self._ready_order)
        rest = [n for n in self._layout.names if n not in self._packed]
        order = self.comm.bcast_obj(seen + rest if self.comm.rank == 0 else None)
        if sorted(order) != sorted(self._layout.names) or order == self._layout.names:
            return
        self._set_layout(order, self._params())

    # -- one step -----------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._packed: set[str] = set()
        self._missing: set[str] = set()
        self._ready_order: list[str] = []
        self._bucket_left: list[int] = []
        self._next_launch = 0
        self._bad = 0
        self._pack_seconds = 0.0
        self._active = False

    def start(self) -> None:
        """Begin a step: call before backward (``__enter__`` does)."""
        self._prepare()
        self._engine.wait()  # nothing of a previous step may still be in flight
        self._engine.begin_step()
        self._reset_step()
        self._bucket_left = [len(b[2]) for b in self._layout.buckets]
        self._hook.reset()
        self._active = True
        self._t_start = time.perf_counter()

    def __enter__(self) -> OverlappedReducer:
        self.start()
        if self.overlap:
            self._hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.overlap:
            self._hook.__exit__(*exc)

    def _on_ready(self, name: str, grad) -> None:
        if name in self._packed:
            return
        self._ready_order.append(name)
        self._pack(name, grad)

    def _pack(self, name: str, grad) -> None:
        t0 = time.perf_counter()
        lay = self._layout
        off = lay.offset[name]
        dst = self._buffer[off:off + lay.size[name]]
        if grad is None:
            dst[...] = 0.0
            self._missing.add(name)
        elif type(grad).__module__.startswith("cupy"):
            dst[...] = grad.get().reshape(-1) * np.float32(1.0 / self.comm.size)
        else:
            kernels.pack_into(np.ascontiguousarray(grad).reshape(-1), dst, 1.0 / self.comm.size, "float32")
        self._packed.add(name)
        self._pack_seconds += time.perf_counter() - t0
        b = lay.bucket_of[name]
        self._bucket_left[b] -= 1
        if self.overlap or not self._active:
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Start every complete bucket from the next one in index order."""
        buckets = self._layout.buckets
        while self._next_launch < len(buckets) and self._bucket_left[self._next_launch] == 0:
            start, stop, _ = buckets[self._next_launch]
            self._engine.launch(self._next_launch, self._buffer[start:stop])
            self._next_launch += 1

    def wait(self) -> None:
        """Finish the step: pack what backward did not report, reduce the rest, write the means.

        Raises NonFiniteGradientError (identically on every rank) after writing the grads
        back when the comm's ``check_finite`` config is on and a mean is not finite.
        """
        if not self._active:
            raise RuntimeError("OverlappedReducer.wait() without a started step (use `with reducer:`)")
        t_backward_end = time.perf_counter()
        params = self._params()
        if not self.zero_fill:
            self.comm.check_params_consistent(self.model, include_grad=True)
        early = len(self._packed)
        self._active = False
        for name in self._layout.names:
            if name not in self._packed:
                self._pack(name, params[name].grad)
        self._launch_ready()
        tracer = get_tracer()
        with collective("overlap_wait", buckets=len(self._layout.buckets)), tracer.span("allreduce"):
            self._engine.wait()
        with tracer.span("unpack", bytes=int(self._buffer.nbytes), dtype="float32"):
            bad = self._unpack(params)
        tracer.add("pack", self._pack_seconds)
        self.stats = {"early_params": early, "params": len(self._layout.names),
                      "buckets": len(self._layout.buckets), "pack_s": self._pack_seconds,
                      "wait_s": time.perf_counter() - t_backward_end,
                      "overlapped_buckets": self._engine.launched_before(t_backward_end)}
        if self._rebuild_pending and self.overlap:
            self._rebuild_from_observed()
        if bad and self.comm.get_config("check_finite"):
            raise NonFiniteGradientError(
                f"gradients diverged: {bad} non-finite values in the averaged gradients", count=bad)

    def _unpack(self, params: dict[str, Any]) -> int:
        bad = 0
        for name in self._layout.names:
            p = params[name]
            if name in self._missing and not self.zero_fill:
                continue
            off = self._layout.offset[name]
            src = self._buffer[off:off + p.size]
            if p.grad is None:
                p.grad = p.xp.zeros_like(p.array)
            if type(p.grad).__module__.startswith("cupy"):
                import cupy

                p.grad[...] = cupy.asarray(src.reshape(p.shape)).astype(p.grad.dtype)
                bad += int((~np.isfinite(src)).sum())
            elif p.grad.flags.c_contiguous:
                bad += kernels.unpack_from(src, p.grad.reshape(-1), 1.0, "float32")
            else:
                tmp = np.empty(p.size, p.grad.dtype)
                bad += kernels.unpack_from(src, tmp, 1.0, "float32")
                p.grad[...] = tmp.reshape(p.shape)
        return bad

    def finalize(self) -> None:
        """Stop the worker thread and free the private communicator. Idempotent."""
        if self._private is not None:
            self._engine.close()
            self._private.finalize()
            self._private = None


class _AsyncHandle:
    """Handle of :func:`mean_grad_async`: ``wait()`` writes the means back (raises like the sync call)."""

    def __init__(self, reducer: OverlappedReducer) -> None:
        self._reducer = reducer

    def test(self) -> bool:
        return self._reducer._engine.done()

    def wait(self) -> None:
        reducer, self._reducer = self._reducer, None
        if reducer is not None:
            reducer.wait()


def mean_grad_async(reducer: OverlappedReducer) -> _AsyncHandle:
    """Start averaging all current grads of ``reducer.model`` at once; progress on the worker thread.

    For double buffering: build the reducer with ``progress='thread'`` so the reduction
    proceeds during the next forward/backward. Returns a handle whose ``wait()`` writes
    the means into the model's grads.
    """
    reducer.start()
    reducer._active = False  # pack everything now and launch immediately
    params = reducer._params()
    for name in reducer._layout.names:
        reducer._pack(name, params[name].grad)
    reducer._launch_ready()
    reducer._active = True
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
