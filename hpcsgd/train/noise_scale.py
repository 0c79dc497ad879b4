"""The gradient noise scale B_noise = tr(Sigma) / |G|^2, measured during data-parallel training.

Why: McCandlish et al. 2018 show that the critical batch size, above which a
larger batch mostly wastes compute, tracks B_noise. Data-parallel training
holds two gradients of different batch sizes at every step for free, and their
Appendix A turns their squared norms into unbiased estimates::

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

* ``G_small``: one micro-batch's gradient (``B_small = batch_per_rank``
  images; micro-batches of fixed size are the unit because BN makes
  per-example gradients ill-defined), ``|G_small|^2`` averaged over every
  micro-batch of every rank;
* ``G_big``: the gradient averaged over ranks and micro-batches
  (``B_big = global_batch``), read by an optimizer pre-update hook: after the
  reduction, before weight decay (a per-parameter update-rule hook) and before
  LARS's trust ratio (inside the update rule).

Single-step estimates are very noisy, so :class:`NoiseScale` smooths
``|G_small|^2`` and ``|G_big|^2`` with a bias-corrected exponential moving
average and reports the ratio of the smoothed estimates, never an average of
ratios (which a near-zero ``|G|^2`` estimate ruins). Both estimators and the
EMA are linear, so each rank smooths its own ``|G_small|^2`` and the rank mean
is taken only when a record is logged: one ``Allreduce`` of three float64 per
``log_interval``, no per-step collective.

The local squared norms come from one of two sources, chosen in :func:`local_source`:
with two or more ranks and one micro-batch, the gradient reduction's own bucket
pass (:class:`PackPassLocalNorms`, :data:`hpcsgd.comm.packing.LOCAL_SQ_NORM`);
with micro-batches, :class:`DriverLocalNorms` (a pass over the gradients after
each micro-batch's backward, see :func:`sq_norm`). Units: squared gradient
norms in (loss units / parameter unit)^2, batch sizes and B_noise in images.
"""

from __future__ import annotations

import collections
import math

import numpy as np

#: Default EMA decay per optimizer step (time constant ~100 steps).
DEFAULT_DECAY = 0.99
#: Arrays at least this long use the parallel numba kernels; shorter ones one BLAS dot.
_NUMBA_MIN = 1 << 15


def estimate(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from mean squared norms at batch sizes ``b_small`` < ``b_big`` (Appendix A)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def ratio(trace: float, g2: float) -> float | None:
    """B_noise = tr(Sigma) / |G|^2, or None while the |G|^2 estimate is not positive (noise-dominated)."""
    if not (math.isfinite(trace) and math.isfinite(g2)) or g2 <= 0:
        return None
    return trace / g2


# -- fused squared-norm passes ----------------------------------------------------------------------
_kernels = None


def _numba_kernels():
    """(sq, diff_sq) numba kernels, float64 accumulation; None where numba is missing."""
    global _kernels
    if _kernels is None:
        try:
            import numba

            from hpcsgd.kernels._numba import kernel
        except ImportError:  # numba is a dependency; keep the estimator usable without it
            _kernels = ()
            return None

        @kernel
        def sq(a):
            s = 0.0
            for i in numba.prange(a.size):
                v = np.float64(a[i])
                s += v * v
            return s

        @kernel
        def diff_sq(a, b):
            s = 0.0
            for i in numba.prange(a.size):
                v = np.float64(a[i]) - np.float64(b[i])
                s += v * v
            return s

        _kernels = (sq, diff_sq)
    return _kernels or None


def sq_norm(arrays, previous=None) -> float:
    """sum_i |a_i - p_i|^2 over ``arrays`` (``previous``: same-shaped arrays, or None for zeros).

    One read of each array (and of its previous value): numba for large NumPy
    arrays (float64 accumulation), one BLAS dot for small ones, a device
    reduction with a single synchronization for CuPy.
    """
    total, device = 0.0, None
    kernels = None
    for i, a in enumerate(arrays):
        p = None if previous is None else previous[i]
        if not isinstance(a, np.ndarray):  # CuPy: reduce on the device, sync once below
            d = a if p is None else a - p
            part = (d.ravel().astype("float64") ** 2).sum()
            device = part if device is None else device + part
            continue
        a1 = a.reshape(-1)
        p1 = None if p is None else p.reshape(-1)
        if a1.size >= _NUMBA_MIN and (kernels := kernels or _numba_kernels()):
            total += kernels[0](a1) if p1 is None else kernels[1](a1, p1)
        else:
            d = a1 if p1 is None else a1 - p1
            total += float(np.dot(d.astype(np.float64), d.astype(np.float64)))
    return total + (float(device) if device is not None else 0.0)


# -- where |G_small|^2 comes from ------------------------------------------------------------------
class DriverLocalNorms:
    """This rank's per-micro-batch squared gradient norms, taken after each micro-batch's backward.

    Why no copy: Chainer never writes a gradient in place (accumulation builds a
    new array, see :mod:`hpcsgd.comm.packing`), so keeping references to the
    previous micro-batch's ``param.grad`` arrays is enough to difference them.
    The micro-batch loss is scaled by ``1/accum`` (``accumulate_gradients``), so
    a difference is ``accum`` times smaller than the micro-batch gradient.

    ``skip_last``: with ``overlap`` the last micro-batch's gradients are packed
    and reduced during its backward, so only the micro-batches before it are
    measured (any subset is unbiased).
    """

    def __init__(self, model, skip_last: bool = False) -> None:
        self.model = model
        self.skip_last = skip_last
        self._sum, self._n, self._prev = 0.0, 0, None

    def after_backward(self, micro: int, accum: int) -> None:
        """Called by ``accumulate_gradients`` after micro-batch ``micro`` (0-based) of ``accum``."""
        last = micro == accum - 1
        if last and self.skip_last:
            self._prev = None
            return
        params = [p for p in self.model.params() if p.grad is not None]
        grads = [p.grad for p in params]
        before = self._prev or {}
        previous = [before.get(id(p)) for p in params]  # None: no gradient before this micro-batch
        same = [g is q for g, q in zip(grads, previous)]  # untouched by this micro-batch: adds zero
        if micro > 0 and grads and all(same):
            raise RuntimeError("noise scale: every gradient is the previous micro-batch's array, so they "
                               "are accumulated in place and the per-micro-batch difference is "
                               "unavailable (set noise_scale: false)")
        fresh = [g for g, q in zip(grads, previous) if q is None]
        diffs = [(g, q) for g, q, k in zip(grads, previous, same) if q is not None and not k]
        sq = sq_norm(fresh) + (sq_norm(*zip(*diffs)) if diffs else 0.0)
        self._sum += sq * accum * accum
        self._n += 1
        self._prev = None if last else {id(p): g for p, g in zip(params, grads)}

    def take(self) -> tuple[float, int]:
        """(sum of this step's micro-batch |g|^2, count), and reset for the next step."""
        out = (self._sum, self._n)
        self._sum, self._n, self._prev = 0.0, 0, None
        return out


class PackPassLocalNorms:
    """|G_small|^2 from the gradient reduction's bucket pass (:data:`~hpcsgd.comm.packing.LOCAL_SQ_NORM`).

    Why: the reduction engine reads every local gradient right before packing it;
    summing the float64 squares there (per bucket, before any division by the
    world size or 16-bit cast) replaces the separate per-micro-batch pass, and with
    ``overlap`` it sees the gradients before they are reduced in place. It sees the
    rank's *accumulated* gradient, the mean of its micro-batches' gradients, so its
    batch is the rank's whole batch (``batch_per_rank x grad_accumulation``).

    The value is published when the reduction is waited for, which is before the
    optimizer's pre-update hook of the step that applies it, also with double
    buffering (the reduction of step t-1 is waited for in step t): so this source
    pairs with ``lag=0``. A step without a completed reduction reads as no sample.
    """

    def __init__(self) -> None:
        from hpcsgd.comm.packing import LOCAL_SQ_NORM

        self._sink = LOCAL_SQ_NORM
        self._seen = self._sink.subscribe(self)

    def after_backward(self, micro: int, accum: int) -> None:
        """Nothing to do during backward: the reduction measures."""

    def take(self) -> tuple[float, int]:
        """(last completed reduction's |g_local|^2, 1); (0.0, 0) if none completed since the last take."""
        value, serial = self._sink.read()
        if serial == self._seen:
            return 0.0, 0
        self._seen = serial
        return value, 1


class _EMA:
    """Bias-corrected exponential moving average (linear in its inputs)."""

    def __init__(self, decay: float) -> None:
        self.decay, self.value, self.weight = decay, 0.0, 0.0

    def add(self, x: float) -> None:
        self.value = self.decay * self.value + (1.0 - self.decay) * x
        self.weight = self.decay * self.weight + (1.0 - self.decay)

    def get(self) -> float:
        return self.value / self.weight if self.weight > 0 else math.nan


class NoiseScale:
    """Tracks B_noise over a run; see the module docstring.

    Per step: ``local.after_backward`` (via ``accumulate_gradients``), the
    optimizer pre-hook :meth:`big_hook` (only when an update is applied), then
    :meth:`end_step`. Per log interval: :meth:`aggregate` (collective).
    ``lag=1`` for double buffering with a source that measures during the step
    (:class:`DriverLocalNorms`): its update applies the previous step's averaged
    gradients, which are paired with that step's local norms.
    """

    def __init__(self, b_small: int, b_big: int, local, decay: float = DEFAULT_DECAY, lag: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"noise-scale EMA decay must be in (0, 1), got {decay}")
        estimate(1.0, 1.0, b_small, b_big)  # validates the batch sizes
        self.b_small, self.b_big, self.decay, self.local = int(b_small), int(b_big), float(decay), local
        self._smalls = collections.deque(maxlen=lag + 1)
        self._big = None
        self.ema_small, self.ema_big = _EMA(decay), _EMA(decay)
        self.steps = 0
        self._reset_interval()

    def _reset_interval(self) -> None:
        self.int_small, self.int_big, self.int_n = 0.0, 0.0, 0

    def big_hook(self, optimizer) -> None:
        """Chainer optimizer pre-update hook: |G_big|^2 of the averaged gradient about to be applied."""
        self._big = sq_norm([p.grad for p in optimizer.target.params() if p.grad is not None])

    def end_step(self) -> None:
        """Pair this step's local norms with the applied averaged gradient's norm, if any."""
        total, n = self.local.take()
        self._smalls.append(total / n if n else None)
        big, self._big = self._big, None
        if big is None or len(self._smalls) < self._smalls.maxlen or self._smalls[0] is None:
            return  # no update applied (skipped, or double buffering's first step)
        small = self._smalls[0]
        self.ema_small.add(small)
        self.ema_big.add(big)
        self.int_small += small
        self.int_big += big
        self.int_n += 1
        self.steps += 1

    def aggregate(self, comm) -> dict:
        """Collective: the smoothed and the interval's raw estimates (identical on every rank)."""
        from hpcsgd.runtime.watchdog import collective

        mpi = getattr(comm, "mpi_comm", comm)
        local = np.array([self.ema_small.get() if self.ema_small.weight else 0.0, self.int_small,
                          float(self.int_n)], dtype=np.float64)
        total = np.empty_like(local)
        with collective("allreduce", what="noise-scale norms"):
            mpi.Allreduce(local, total)
        size = mpi.Get_size()
        rec = {"b_small": self.b_small, "b_big": self.b_big, "steps": self.steps}
        if self.steps:
            g2, tr = estimate(total[0] / size, self.ema_big.get(), self.b_small, self.b_big)
            rec.update(b_noise=ratio(tr, g2), grad_sq=g2, trace_sigma=tr)
        if self.int_n:
            n = self.int_n
            g2, tr = estimate(total[1] / size / n, self.int_big / n, self.b_small, self.b_big)
            rec.update(b_noise_raw=ratio(tr, g2), grad_sq_raw=g2, trace_sigma_raw=tr, raw_steps=n,
                       small_sq_raw=total[1] / size / n, big_sq_raw=self.int_big / n)
        self._reset_interval()
        return rec


def disabled_reason(cfg: dict) -> str | None:
    """Why the driver measures no noise scale for ``cfg`` (None: it does)."""
    if not cfg.get("noise_scale", True):
        return "noise_scale: false"
    if cfg["world_size"] * cfg["grad_accumulation"] < 2:
        return "1 rank and 1 micro-batch: no second batch size to compare"
    return None


def uses_pack_pass(cfg: dict) -> bool:
    """True when |G_small|^2 comes from the reduction's bucket pass (two or more ranks, one micro-batch).

    Why not with micro-batches: the reduction sees only each rank's accumulated
    gradient (B_small = ``batch_per_rank x grad_accumulation``, ``world_size``
    samples per step), while the per-micro-batch source has B_small =
    ``batch_per_rank`` and ``world_size x grad_accumulation`` samples. For
    noise-dominated norms the standard error of tr(Sigma) is about
    sqrt(grad_accumulation) times smaller with the latter (docs/noise_scale.md),
    so accumulating runs keep it. One rank has no reduction to measure in.
    """
    return cfg["world_size"] > 1 and cfg["grad_accumulation"] == 1


def local_source(cfg: dict, model):
    """(source of |G_small|^2, B_small in images, lag): the one place that chooses the source.

    ``lag`` is the :class:`NoiseScale` pairing lag: 1 for double buffering with the
    per-micro-batch source (its norms are taken a step before their average is
    applied), 0 otherwise (see :class:`PackPassLocalNorms`).
    """
    if uses_pack_pass(cfg):
        return PackPassLocalNorms(), cfg["batch_per_rank"], 0
    lag = 1 if cfg["double_buffering"] else 0
    return DriverLocalNorms(model, skip_last=cfg["overlap"]), cfg["batch_per_rank"], lag


def from_config(cfg: dict, model, optimizer, comm=None) -> NoiseScale | None:
    """The run's tracker with its optimizer hook installed, or None (see :func:`disabled_reason`)."""
    if disabled_reason(cfg):
        return None
    local, b_small, lag = local_source(cfg, model)
    noise = NoiseScale(b_small, cfg["global_batch"], local, decay=cfg["noise_scale_ema"], lag=lag)
    optimizer.add_hook(noise.big_hook, name="noise_scale", timing="pre")
    hooks = getattr(optimizer, "_hookable", None)
    pre = getattr(hooks, "_pre_update_hooks", None)
    if isinstance(pre, collections.OrderedDict):
        pre.move_to_end("noise_scale", last=False)  # before any gradient-changing pre-hook (clipping)
    return noise
