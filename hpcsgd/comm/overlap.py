"""Gradient allreduce overlapped with backward: a bucket starts as soon as its grads are final.

Usage (what the multi-node optimizer does)::

    reducer = OverlappedReducer(comm, model)          # once (collective)
    model.cleargrads()
    loss = lossfun(model(x), t)
    with reducer:                                      # hook active during backward
        loss.backward()
    reducer.wait()                                     # grads := mean over ranks
    optimizer.update()

This is one of the three drivers of the one engine
(:class:`~hpcsgd.comm.reducer.GradReducer`, threaded, on a private clone of
``comm`` so reductions in flight never interleave with the caller's collectives):

* **Layout.** The engine's flat layout is in the order gradients become final
  during backward. The first pass uses reversed registration order; afterwards
  the layout is rebuilt once from the order observed on rank 0 (broadcast, so
  every rank has the same buckets), as PyTorch DDP does.
* **Readiness.** :class:`~hpcsgd.comm._grad_ready.GradReadyHook` reports each
  parameter's gradient the moment it is final (parameters used several times are
  counted); it is placed into the engine at once: reduced in place when backward
  can no longer read its memory, else copied into the engine's persistent buffer
  (``param.grad`` then becomes a view of it, valid until the next step's ``wait()``).
* **Launch.** A bucket whose parameters are all placed is launched on the
  worker. Buckets launch strictly in index order, so every rank starts the same
  collectives in the same order even if readiness order differs. Whatever
  backward did not report (unused parameters, a missing hook) is placed from
  ``param.grad`` in :meth:`OverlappedReducer.wait`.
* ``overlap=False`` keeps everything identical except that all buckets start in
  ``wait()``: the in-run baseline, bitwise equal.

Unused parameters follow ``multi_node_mean_grad``: with ``zero_fill`` a missing
gradient is zeros; without, a parameter missing on every rank keeps ``grad=None``
and one missing on some ranks counts as zeros there (with a warning).
CPU only: the combination check rejects overlap for CuPy gradients until it is
validated on a GPU.
"""

from __future__ import annotations

import time
from typing import Any

from hpcsgd.comm._grad_ready import GradReadyHook
from hpcsgd.comm.bucket_algorithm import raise_if_nonfinite
from hpcsgd.comm.packing import GradLayout
from hpcsgd.comm.reducer import GradReducer
from hpcsgd.errors import ConfigError
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.runtime.watchdog import collective

#: Default bucket size in bytes of float32 gradients; see docs/overlap.md for the measurement.
DEFAULT_BUCKET_BYTES = 4 << 20


def _on_gpu(model) -> bool:
    return any(type(p.array).__module__.startswith("cupy") for p in model.params() if p.array is not None)


class OverlappedReducer:
    """Averages a model's gradients over ranks, overlapping the allreduce with backward.

    Args:
        comm: an hpcsgd communicator with a bucket algorithm (every registered one).
        model: the chainer.Link whose parameters' grads are averaged.
        bucket_bytes: bytes per bucket (default :data:`DEFAULT_BUCKET_BYTES`).
        zero_fill: a parameter with data but no grad joins with zeros and gets the mean
            (ChainerMN's ``zero_fill=True``); False: see the module docstring.
        overlap: False starts every bucket in ``wait()`` (baseline for measurements).
        rebuild_order: rebuild the buckets once from the observed readiness order.
    """

    def __init__(self, comm, model, bucket_bytes: int | None = None, zero_fill: bool = True,
                 overlap: bool = True, rebuild_order: bool = True) -> None:
        from hpcsgd.comm import check_combination

        check_combination(comm, overlap=True, double_buffering=False, gpu=_on_gpu(model))
        bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        if isinstance(bucket_bytes, bool) or int(bucket_bytes) <= 0:
            raise ConfigError(f"bucket_bytes must be a positive number of bytes, got {bucket_bytes!r}")
        self.comm = comm
        self.model = model
        self.bucket_bytes = int(bucket_bytes)
        self.zero_fill = zero_fill
        self.overlap = overlap
        self._rebuild_pending = rebuild_order
        self._private = comm.split(0, comm.rank)  # own MPI communicators for reductions in flight
        self._private.set_config("bucket_bytes", self.bucket_bytes)
        self._signature = None
        self._engine: GradReducer | None = None
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
        if _on_gpu(self.model):
            from hpcsgd.comm import check_combination

            check_combination(self.comm, overlap=True, double_buffering=False, gpu=True)
        self.comm.check_params_consistent(self.model, include_grad=False)
        params = self._params()
        self._set_layout(list(reversed(list(params))), params)  # reversed registration ~ backward order
        self._signature = sig

    def _set_layout(self, order: list[str], params: dict[str, Any]) -> None:
        if self._engine is not None:
            self._engine.close()
        layout = GradLayout.from_named([(n, params[n]) for n in order])
        self._engine = GradReducer(self._private, layout, threaded=True)
        self._buckets_of: dict[str, list[int]] = {}
        for i in range(self._engine.n_buckets):
            for name in self._engine.bucket_params(i):
                self._buckets_of.setdefault(name, []).append(i)
        nodes = {params[n].node: n for n in order}
        self._hook = GradReadyHook(nodes, self._on_ready)

    def _rebuild_from_observed(self) -> None:
        """Adopt rank 0's observed readiness order (collective; between steps)."""
        self._rebuild_pending = False
        names = [s.name for s in self._engine.layout.slots]
        order = self._ready_order + [n for n in names if n not in set(self._ready_order)]
        order = self.comm.bcast_obj(order if self.comm.rank == 0 else None)
        if sorted(order) == sorted(names) and order != names:
            self._set_layout(order, self._params())

    # -- one step -----------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._placed: set[str] = set()
        self._ready_order: list[str] = []
        self._bucket_left: list[int] = []
        self._next_launch = 0
        self._pack_seconds = 0.0
        self._active = False

    def start(self) -> None:
        """Begin a step: call before backward (``__enter__`` does)."""
        self._prepare()
        self._engine.wait()  # nothing of a previous step may still be in flight
        self._engine.begin()
        self._reset_step()
        self._bucket_left = [len(self._engine.bucket_slots[i]) for i in range(self._engine.n_buckets)]
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
        self._engine.place(self._engine.layout.index[name], grad, owned)
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
            self._engine.launch(self._next_launch)
            self._next_launch += 1

    def _place_rest(self) -> None:
        """Place every gradient backward did not report, from ``param.grad``, and launch all buckets."""
        self._active = False
        params = self._params()
        for s in self._engine.layout.slots:
            if s.name not in self._placed:  # after backward: nothing else reads param.grad
                self._place(s.name, params[s.name].grad, True)
        self._launch_ready()

    def wait(self) -> None:
        """Finish the step: place what backward did not report, reduce the rest, write the means.

        Sets ``comm.nonfinite_count``; with the comm's ``check_finite`` on, raises
        NonFiniteGradientError (GradientOverflowError for a 16-bit wire) identically on every
        rank, after writing the grads back.
        """
        if not self._active and self._next_launch == 0:
            raise RuntimeError("OverlappedReducer.wait() without a started step (use `with reducer:`)")
        t_end = time.perf_counter()
        early = len(self._placed)
        skip: set[str] = set()
        if not self.zero_fill:  # which grads exist anywhere (zeros where missing, as the engine placed)
            have = {n for n, _ in self.comm.select_grads(self.model, zero_fill=False)}
            skip = set(self._params()) - have
        self._place_rest()
        tracer = get_tracer()
        with collective("overlap_wait", buckets=len(self._bucket_left)), tracer.span("allreduce"):
            bad = self._engine.wait()
        with tracer.span("unpack", bytes=4 * self._engine.layout.total, dtype="float32"):
            self._engine.write_back(self._params(), skip)
        tracer.add("pack", self._pack_seconds)
        self.stats = {"early_params": early, "params": len(self._placed), "buckets": len(self._bucket_left),
                      "pack_s": self._pack_seconds, "wait_s": time.perf_counter() - t_end,
                      "overlapped_buckets": sum(1 for t in self._engine.launch_times if t < t_end)}
        self._active = False
        self._next_launch = 0
        if self._rebuild_pending and self.overlap:
            self._rebuild_from_observed()
        self.comm.nonfinite_count = bad
        if bad and self.comm.get_config("check_finite"):
            raise_if_nonfinite(bad, self._engine.low_precision, self._engine.wire_label)

    def finalize(self) -> None:
        """Stop the worker thread and free the private communicator. Idempotent."""
        if self._private is not None:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            self._private.finalize()
            self._private = None
