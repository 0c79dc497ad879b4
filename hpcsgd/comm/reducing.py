"""``ReducingCommunicator``: gradient means through the engine, for every registered algorithm.

Subclasses (naive, flat, hierarchical, nccl, dummy) implement only
:meth:`~hpcsgd.comm.base.CommunicatorBase.bucket_algorithm`. This class drives
the :class:`~hpcsgd.comm.reducer.GradReducer` engine with it:

* ``multi_node_mean_grad``: select the parameters (:meth:`select_grads`: sorted
  names, ``zero_fill`` and unused-parameter rules, one 16-byte allreduce to check
  that all ranks agree), run every bucket inline on a cached engine for that layout;
* ``multi_node_mean_grad_async`` (double buffering): the same on a threaded engine
  of a private clone of this communicator (``split``: same class and config, own
  MPI communicators), so the reduction in flight never interleaves with the
  caller's collectives; ``handle.wait()`` finishes it;
* after either: :attr:`nonfinite_count` holds the count of inf/nan averaged values
  (identical on every rank); with ``check_finite`` on, a non-zero count raises.

Engines (buffers, shared-memory windows) are cached per layout and reused; a
change of an option that shapes them frees them at the next (collective) call.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import chainer

from hpcsgd.comm.base import CompletedHandle
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm, raise_if_nonfinite
from hpcsgd.comm.fp16_reduce import check_half_scaling, check_wire_ranks
from hpcsgd.comm.mpi_base import MpiCommunicatorBase
from hpcsgd.comm.packing import GradLayout
from hpcsgd.comm.reducer import GradReducer
from hpcsgd.comm.wire_kernels import WIRE_FORMATS
from hpcsgd.errors import ConfigError
from hpcsgd.runtime.watchdog import collective

#: options that do not change what an engine computes: changing them keeps the engines
_ENGINE_NEUTRAL = ("check_finite", "batched_copy")


class ReducingCommunicator(MpiCommunicatorBase):
    """Gradient means through a per-layout :class:`GradReducer` (subclasses give the algorithm)."""

    #: (intra, inter) wire formats when neither ``allreduce_grad_dtype`` nor the level option is set
    DEFAULT_WIRE = ("float32", "float32")
    #: float16 wire: ``half_scaling`` 'chunk' (power-of-two scale per message; on GPU one per
    #: bucket, common to all ranks, see half_scale.py) or 'predivide'
    #: (grad / size cast directly); ``wire_ranks`` (study only): divide by this many ranks
    #: instead of the real size before the 16-bit cast and rescale after (see fp16_reduce.py)
    CONFIG_DEFAULTS = {**MpiCommunicatorBase.CONFIG_DEFAULTS, "half_scaling": "chunk", "wire_ranks": None}

    def __init__(self, mpi_comm=None, **config: Any) -> None:
        self._reducers: dict[Any, GradReducer] = {}
        self._stale: list = []  # engines and clones to free at the next collective call
        self._async_clone: ReducingCommunicator | None = None
        self._pending: _PendingMean | None = None
        super().__init__(mpi_comm=mpi_comm, **config)

    # -- configuration -------------------------------------------------------------
    def _validate_config(self, name: str, value: Any) -> Any:
        if name == "half_scaling":
            return check_half_scaling(value)
        if name == "wire_ranks":
            return check_wire_ranks(value)
        return super()._validate_config(name, value)

    def half_wire_options(self) -> dict:
        """Keyword arguments of the 16-bit wire for the algorithms (``half_scaling``, ``wire_ranks``)."""
        return {"half_scaling": self.get_config("half_scaling"), "wire_ranks": self.get_config("wire_ranks")}

    def _on_config_change(self, name: str, value: Any) -> None:
        if name in _ENGINE_NEUTRAL or "_reducers" not in self.__dict__:
            return
        self._stale.extend(self._reducers.values())
        self._reducers = {}
        if self._async_clone is not None:  # the clone copied the old config
            self._stale.append(self._async_clone)
            self._async_clone = None

    #: the levels whose wire ``allreduce_grad_dtype`` sets (a level option still wins)
    GRAD_DTYPE_LEVELS = ("intra_dtype", "inter_dtype")

    def wire_formats(self) -> tuple[str, str]:
        """(intra-node, inter-node) wire format in effect (level option > allreduce_grad_dtype > default)."""
        common = self._configs["allreduce_grad_dtype"]
        out = []
        for level, default in zip(("intra_dtype", "inter_dtype"), self.DEFAULT_WIRE):
            w = self._configs[level] or (common if level in self.GRAD_DTYPE_LEVELS else None) or default
            if w not in WIRE_FORMATS:
                raise ConfigError(f"config {level!r}: {type(self).__name__} supports wire formats "
                                  f"{WIRE_FORMATS}, got {w!r}")
            out.append(w)
        return out[0], out[1]

    def single_wire(self) -> str:
        """The wire format that crosses the slowest link: inter-node when the job spans nodes, else intra.

        Why one rule: it is both the wire of the one-level algorithms (flat, naive, nccl)
        and the ``allreduce_grad_dtype`` a communicator reports.
        """
        intra, inter = self.wire_formats()
        return inter if self.inter_size > 1 else intra

    def _effective_config(self, name: str, value: Any) -> Any:
        if name in ("intra_dtype", "inter_dtype", "allreduce_grad_dtype"):
            intra, inter = self.wire_formats()
            if name == "intra_dtype":
                return intra
            if name == "inter_dtype":
                return inter
            return self.single_wire()
        return value

    # -- the per-bucket algorithm ----------------------------------------------------
    @abstractmethod
    def bucket_algorithm(self, layout: GradLayout) -> BucketAlgorithm:
        """Build the per-layout algorithm (collective: may allocate shared windows)."""

    def _free_stale(self) -> None:
        while self._stale:
            item = self._stale.pop(0)
            if isinstance(item, GradReducer):
                item.close()
            else:  # an async clone
                item.finalize()

    def _reducer_for(self, params: list, threaded: bool) -> GradReducer:
        """The cached engine for ``params``' layout (collective when it is built)."""
        self._free_stale()
        layout = GradLayout.from_named(params)
        key = (layout.key, threaded)
        reducer = self._reducers.get(key)
        if reducer is None:
            if len(self._reducers) >= 4:  # e.g. alternating zero_fill sets: keep a few
                self._stale.extend(self._reducers.values())
                self._reducers = {}
                self._free_stale()
            reducer = GradReducer(self, layout, threaded)
            self._reducers[key] = reducer
        return reducer

    def grad_reducer(self, model, zero_fill: bool = False, threaded: bool = False) -> GradReducer:
        """The engine bound to ``model``'s current gradients, nothing launched yet (collective).

        For driving buckets by hand (``launch(i)`` in order, then ``wait()``); the
        parameter selection is :meth:`select_grads`'s.
        """
        params = self.select_grads(model, zero_fill)
        reducer = self._reducer_for(params, threaded)
        reducer.bind(params)
        return reducer

    # -- gradient mean ------------------------------------------------------------------
    def _finish(self, bad: int, reducer: GradReducer) -> None:
        """Record the non-finite count; raise per ``check_finite``, else in Chainer's debug mode.

        ``bad`` is the same on every rank, so every rank raises or none does.
        """
        self.nonfinite_count = bad
        if self._configs["check_finite"]:
            raise_if_nonfinite(bad, reducer.low_precision, reducer.wire_label)
        elif bad and chainer.is_debug():  # ChainerMN's debug-mode check, with its message
            raise ValueError(f"Parameters diverged after allreduce. ({bad} averaged gradient values "
                             "are inf/nan; chainer.set_debug(True) checks every mean)")

    def multi_node_mean_grad(self, model, zero_fill: bool = False) -> None:
        reducer = self.grad_reducer(model, zero_fill)
        reducer.launch_all()
        self._finish(reducer.wait(), reducer)

    def multi_node_mean_grad_async(self, model, zero_fill: bool = False):
        """Start the mean on the engine's worker thread; ``handle.wait()`` finishes it.

        Bitwise the blocking result. Do not touch ``model``'s grads before ``wait()``;
        one reduction is in flight at a time (a new call first waits for the previous).
        Errors (parameter mismatch, non-finite with ``check_finite``) surface in ``wait()``.
        """
        if self._pending is not None:
            self._pending.wait()
        if self._async_clone is None:
            self._free_stale()
            self._async_clone = self.split(0, self.rank)
        try:
            reducer = self._async_clone.grad_reducer(model, zero_fill, threaded=True)
            reducer.launch_all()
        except Exception as e:  # raised identically on every rank; re-raised by wait()
            return CompletedHandle(e)
        self._pending = _PendingMean(self, reducer)
        return self._pending

    def finalize(self) -> None:
        if self._finalized:
            return
        try:
            if self._pending is not None:
                self._pending.wait()
        finally:
            self._stale.extend(self._reducers.values())
            self._reducers = {}
            if self._async_clone is not None:
                self._stale.append(self._async_clone)
                self._async_clone = None
            self._free_stale()
            super().finalize()


class _PendingMean:
    """Handle of :meth:`ReducingCommunicator.multi_node_mean_grad_async`."""

    def __init__(self, comm: ReducingCommunicator, reducer: GradReducer) -> None:
        self._comm, self._reducer = comm, reducer

    def test(self) -> bool:
        """True when the reduction has finished (``wait()`` will not block)."""
        return self._reducer is None or self._reducer.idle()

    def wait(self) -> None:
        """Finish: the means are in the grads; raises like the blocking call (once)."""
        reducer, self._reducer = self._reducer, None
        if reducer is None:
            return
        comm = self._comm
        if comm._pending is self:
            comm._pending = None
        with collective("mean_grad_async_wait", buckets=reducer.n_buckets):
            bad = reducer.wait()
        comm._finish(bad, reducer)
