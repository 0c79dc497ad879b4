"""Multi-node optimizer: average gradients across ranks, then update (ChainerMN semantics).

``create_multi_node_optimizer(optimizer, comm)`` wraps any Chainer optimizer:

* ``setup(model)`` sets up the wrapped optimizer and broadcasts the parameters
  from rank 0 (``comm.bcast_data``), so every rank starts identical. If the
  set of initialized parameters changes later (lazily initialized links), the
  next ``update()`` broadcasts again and skips that one update, as ChainerMN
  does (the ranks' gradients were taken at different weights).
* ``update()`` averages the gradients with ``comm.multi_node_mean_grad`` and
  runs the wrapped update inside ``get_tracer().span('update')``.
* Non-finite averaged gradients skip the update on every rank: ``skipped_steps``
  counts them, the parameters and optimizer state are untouched, a warning is
  logged. The wrapper turns on the hpcsgd communicator's ``check_finite`` option
  (a bare communicator averages non-finite values as ChainerMN does), which then
  raises ``NonFiniteGradientError`` identically on every rank. With a communicator
  without that option (e.g. ChainerMN's), the wrapper checks the averaged
  gradients (identical on every rank) itself.
* Unsupported combinations (``overlap`` or ``double_buffering`` with a
  communicator or device that does not support them) raise the same
  :class:`~hpcsgd.errors.ConfigError` as the ``hpcsgd train`` config check
  (:func:`hpcsgd.comm.check_combination`), when the model is known.
* Gradient accumulation (``accumulation_steps=k``): ``update(lossfun, ...)``
  runs forward/backward with the loss scaled by 1/k and applies one allreduce
  + update every k-th call (returns True then). The manual form, which the
  training loop uses, is: ``model.cleargrads()``; k times ``(loss / k).backward()``
  (Chainer accumulates into ``param.grad``); ``optimizer.update()``. The
  averaged gradient is then exactly that of the k times larger batch (mean
  loss over all k * b * size images); only BN differs, because BN statistics
  are computed per micro-batch (b images), not over k * b.
* ``double_buffering=True``: ChainerMN's one-step-stale gradients. Step t
  starts the allreduce of step t's gradients with
  ``comm.multi_node_mean_grad_async`` on a copy of the model and applies the
  averaged gradients of step t-1 (the first step applies nothing). Needs a
  communicator with ``multi_node_mean_grad_async``; call ``finalize()`` (or
  ``wait()``) at the end so no reduction is left in flight.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import chainer

from hpcsgd.errors import NonFiniteGradientError
from hpcsgd.runtime.trace import get_tracer

log = logging.getLogger("hpcsgd.optim")


def _param_signature(target) -> list[tuple[str, bool]]:
    return [(name, p.array is not None) for name, p in sorted(target.namedparams())]


def grads_finite(target) -> bool:
    """True when every gradient of ``target`` is finite (None counts as finite)."""
    for p in target.params():
        g = p.grad
        if g is None:
            continue
        xp = chainer.backend.get_array_module(g)
        if not bool(xp.isfinite(g).all()):
            return False
    return True


def _enable_check_finite(comm) -> bool:
    """Turn on ``comm``'s non-finite check; False when it has no such option (ChainerMN's)."""
    try:
        comm.set_config("check_finite", True)
        return bool(comm.get_config("check_finite"))
    except Exception:  # ChainerMN communicators raise ValueError for unknown options
        return False


def _on_gpu(target) -> bool:
    return any(type(p.array).__module__.startswith("cupy") for p in target.params() if p.array is not None)


class _Proxy:
    """Forwards attribute reads and writes to the wrapped optimizer (like ChainerMN)."""

    _own: tuple[str, ...] = ()

    def __getattr__(self, name):
        actual = self.__dict__.get("actual_optimizer")
        if actual is None:
            raise AttributeError(name)
        return getattr(actual, name)

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.actual_optimizer, name, value)


class MultiNodeOptimizer(_Proxy):
    """See the module docstring. ``skipped_steps``: updates skipped for non-finite gradients."""

    _own = ("actual_optimizer", "communicator", "zero_fill", "skipped_steps", "accumulation_steps",
            "_signature", "_micro", "_check_self", "applied_steps", "overlap", "bucket_bytes",
            "_reducer", "_reducer_started")

    def __init__(self, actual_optimizer, communicator, zero_fill: bool = True, accumulation_steps: int = 1,
                 overlap: bool = False, bucket_bytes: int | None = None):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.actual_optimizer = actual_optimizer
        self.communicator = communicator
        self.zero_fill = zero_fill
        self.skipped_steps = 0
        self.applied_steps = 0
        self.accumulation_steps = int(accumulation_steps)
        self._signature = None
        self._micro = 0
        self._check_self = not _enable_check_finite(communicator)
        self.overlap = overlap
        self.bucket_bytes = bucket_bytes
        self._reducer = None
        self._reducer_started = False
        if getattr(actual_optimizer, "target", None) is not None:
            self._broadcast(actual_optimizer.target)

    # -- overlap -------------------------------------------------------------
    def backward_scope(self, last: bool = True):
        """Context for a backward pass: with ``overlap``, the last micro-step's backward starts
        each gradient bucket's allreduce as soon as it is final (hpcsgd.comm.overlap); the
        following ``update()`` waits for it instead of reducing after backward."""
        if not (self.overlap and last):
            return contextlib.nullcontext()
        if self._reducer is None:
            from hpcsgd.comm.overlap import OverlappedReducer

            self._reducer = OverlappedReducer(self.communicator, self.actual_optimizer.target,
                                              bucket_bytes=self.bucket_bytes, zero_fill=self.zero_fill)
        self._reducer_started = True
        return self._reducer

    def _drain_overlap(self) -> None:
        """Finish a reduction started in backward whose result will not be used."""
        if self._reducer_started:
            self._reducer_started = False
            try:
                self._reducer.wait()
            except NonFiniteGradientError:
                pass

    # -- setup ---------------------------------------------------------------
    def setup(self, link):
        self.actual_optimizer.setup(link)
        self._broadcast(link)
        return self

    def _check_combination(self, target) -> None:
        from hpcsgd.comm import check_combination

        check_combination(self.communicator, overlap=self.overlap,
                          double_buffering=isinstance(self, DoubleBufferingOptimizer), gpu=_on_gpu(target))

    def _broadcast(self, target) -> None:
        self._check_combination(target)
        self._signature = _param_signature(target)
        if all(initialized for _, initialized in self._signature):
            self.communicator.bcast_data(target)
        else:
            self._signature = None  # broadcast once the lazy parameters exist

    def _changed(self, target) -> bool:
        return self._signature != _param_signature(target)

    # -- update --------------------------------------------------------------
    def _backward(self, lossfun, args, kwds) -> None:
        target = self.actual_optimizer.target
        k = self.accumulation_steps
        if self._micro == 0:
            target.cleargrads()
        loss = lossfun(*args, **kwds)
        if k > 1:
            loss = loss * (1.0 / k)
        with self.backward_scope(last=self._micro + 1 == k):
            loss.backward(loss_scale=self.actual_optimizer._loss_scale)
        del loss
        self._micro += 1

    def update(self, lossfun=None, *args, **kwds) -> bool:
        """Average gradients and update; returns True when the parameters were updated."""
        target = self.actual_optimizer.target
        if lossfun is not None:
            self._backward(lossfun, args, kwds)
            if self._micro < self.accumulation_steps:
                return False
        self._micro = 0
        if self._changed(target):
            self._drain_overlap()
            self._broadcast(target)
            return False
        if not self._mean_grad(target):
            return False
        return self._apply()

    def _mean_grad(self, target) -> bool:
        try:
            if self._reducer_started:
                self._reducer_started = False
                self._reducer.wait()
            else:
                self.communicator.multi_node_mean_grad(target, self.zero_fill)
        except NonFiniteGradientError as e:
            self._skip(e)
            return False
        if self._check_self and not grads_finite(target):
            self._skip(NonFiniteGradientError("non-finite averaged gradient"))
            return False
        return True

    def _skip(self, error: Exception) -> None:
        self.skipped_steps += 1
        log.warning("skipping update %d: %s (skipped so far: %d)",
                    self.actual_optimizer.t + 1, error, self.skipped_steps)

    def _apply(self) -> bool:
        with get_tracer().span("update"):
            self.actual_optimizer.update()
        self.applied_steps += 1
        return True

    def wait(self) -> None:
        """Nothing in flight without double buffering."""

    def finalize(self) -> None:
        self.wait()
        if self._reducer is not None:
            self._drain_overlap()
            self._reducer.finalize()
            self._reducer = None


class DoubleBufferingOptimizer(MultiNodeOptimizer):
    """One-step-stale gradients: overlap step t's allreduce with step t+1's forward/backward."""

    _own = MultiNodeOptimizer._own + ("_shadow", "_pending", "_has_stale")

    def __init__(self, actual_optimizer, communicator, zero_fill: bool = True, accumulation_steps: int = 1):
        from hpcsgd.comm import check_combination

        check_combination(communicator, double_buffering=True, gpu=None)  # the device: at setup
        self._shadow = None
        self._pending = None
        self._has_stale = False
        super().__init__(actual_optimizer, communicator, zero_fill, accumulation_steps)

    def _broadcast(self, target) -> None:
        self.wait()
        super()._broadcast(target)
        # The shadow model holds the gradients in flight; links that keep the communicator
        # (sync BN) share it instead of copying it.
        memo = {id(self.communicator): self.communicator}
        self._shadow = copy.deepcopy(target, memo) if self._signature is not None else None
        self._has_stale = False

    def update(self, lossfun=None, *args, **kwds) -> bool:
        target = self.actual_optimizer.target
        if lossfun is not None:
            self._backward(lossfun, args, kwds)
            if self._micro < self.accumulation_steps:
                return False
        self._micro = 0
        if self._signature is None or self._changed(target):
            self._broadcast(target)
            return False
        stale_ok = self._collect()
        # target <- averaged grads of step t-1; shadow <- local grads of step t.
        for (_, p), (_, q) in zip(sorted(target.namedparams()), sorted(self._shadow.namedparams())):
            p.grad, q.grad = q.grad, p.grad
        self._pending = self.communicator.multi_node_mean_grad_async(self._shadow, self.zero_fill)
        if not (self._has_stale and stale_ok):
            self._has_stale = True
            return False
        return self._apply()

    def _collect(self) -> bool:
        """Wait for the allreduce in flight; False when its result must not be applied."""
        if self._pending is None:
            return False
        handle, self._pending = self._pending, None
        try:
            handle.wait()
        except NonFiniteGradientError as e:
            self._skip(e)
            return False
        if self._check_self and not grads_finite(self._shadow):
            self._skip(NonFiniteGradientError("non-finite averaged gradient"))
            return False
        return True

    def wait(self) -> None:
        """Finish the allreduce in flight (its gradients are dropped)."""
        if self._pending is not None:
            handle, self._pending = self._pending, None
            try:
                handle.wait()
            except NonFiniteGradientError:
                pass


def create_multi_node_optimizer(actual_optimizer, communicator, double_buffering: bool = False,
                                zero_fill: bool = True, accumulation_steps: int = 1, overlap: bool = False,
                                bucket_bytes: int | None = None):
    """Wrap a Chainer optimizer so it averages gradients over ``communicator`` before each update.

    Args:
        actual_optimizer: any Chainer optimizer (set up now or later via ``.setup(model)``).
        communicator: an hpcsgd or ChainerMN communicator.
        double_buffering: apply one-step-stale gradients, overlapping the allreduce (see module doc).
        zero_fill: a parameter whose gradient is None joins the allreduce with zeros.
        accumulation_steps: micro-batches per update when ``update(lossfun, ...)`` is used.
        overlap: start each bucket's allreduce during backward (wrap the last micro-step's
            ``backward()`` in ``optimizer.backward_scope()``; ``update(lossfun)`` does it itself).
        bucket_bytes: bucket size for ``overlap`` (None: hpcsgd.comm.overlap's measured default).
    """
    from hpcsgd.comm import check_combination

    check_combination(communicator, overlap=overlap, double_buffering=double_buffering, gpu=None)
    if double_buffering:
        return DoubleBufferingOptimizer(actual_optimizer, communicator, zero_fill=zero_fill,
                                        accumulation_steps=accumulation_steps)
    return MultiNodeOptimizer(actual_optimizer, communicator, zero_fill=zero_fill,
                              accumulation_steps=accumulation_steps, overlap=overlap,
                              bucket_bytes=bucket_bytes)
