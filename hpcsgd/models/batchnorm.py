"""Batch normalization with the four evaluation-statistics rules hpcsgd compares.

Training always normalizes with batch statistics (``ops.batch_norm``); the
modes differ in what inference uses and, for 'sync', in which batch:

* ``'batch'`` (Akiba et al.): no moving averages. Each rank keeps the mean and
  (biased) variance of its *last* training minibatch; before evaluation
  :func:`hpcsgd.models.prepare_for_eval` averages them across ranks with
  ``comm._multi_node_mean``. How the variances are combined is
  ``var_combine``:

  - ``'corrected'`` (default): ``var = (mean_r(var_r) + mean_r((mean_r - mean)^2)) * N/(N-1)``
    with ``mean = mean_r(mean_r)`` and ``N`` the images over all ranks: the
    law of total variance, i.e. exactly the (unbiased) variance of the union
    of the ranks' last minibatches when they are of equal size.
  - ``'mean'``: ``var = mean_r(var_r * n/(n-1))``, the plain mean of the
    per-rank unbiased variances: what BN(decay=0) + ChainerMN's
    ``AllreducePersistent`` computes, the likely Akiba mapping (UNCONFIRMED).

  Why 'corrected' is the default: the plain mean of *biased* variances misses
  the spread of the per-rank means (papers.md sec. 1(d) pitfall 2). With
  n/(n-1)-corrected per-rank variances and i.i.d. shards both rules are
  unbiased estimates of the population variance, but 'corrected' is the
  exact statistic of all R*n images (lower variance), and it stays right when
  rank shards differ in distribution (e.g. unshuffled shards), where the plain
  mean underestimates. Its cost is a second allreduce of C floats per layer
  per evaluation. Unbiased (n/(n-1)) variance for inference is Chainer's
  convention (UNCONFIRMED for Akiba).

  Under gradient accumulation the "last minibatch" of a rank is the whole
  last step, i.e. all its micro-batches, each of which plays the part of one
  of the paper's workers. After :func:`start_step` (called by the training
  loop before the first micro-batch of every step), the link folds each
  micro-batch into the step's statistics: ``last_mean`` is the count-weighted
  mean of the micro-batch means; ``last_var`` is the pooled (biased) variance
  of all the step's images for 'corrected', or the count-weighted mean of the
  micro-batch variances for 'mean'; ``last_count`` is the step's image count
  per channel ('corrected') or the micro-batch count ('mean', whose n/(n-1)
  applies per micro-batch). Without ``start_step`` every forward starts anew.
* ``'recompute'``: before evaluation, ``prepare_for_eval(model, comm, batches)``
  runs K training-mode forward passes (no backprop) and sets the population
  statistics ``mean = E[x]``, ``var = (E[x^2] - mean^2) * N/(N-1)`` over all
  K batches of all ranks ("precise BN").
* ``'running'`` (Goyal et al.): ``avg = decay * avg + (1 - decay) * batch``
  with ``decay = 0.9`` (unbiased batch variance, as Chainer). Each rank keeps
  its own; ``prepare_for_eval`` averages them across ranks (ChainerMN's
  AllreducePersistent) so every rank evaluates the same model.
* ``'sync'`` (ChainerMN MultiNodeBatchNormalization): statistics over the
  *global* batch: the forward pass allreduces per-channel ``sum(x)``,
  ``sum(x^2)`` and the image count (so unequal per-rank batches are exact);
  the backward pass allreduces ``sum(gy)`` and ``sum(gy * xhat)``. The
  returned gamma/beta gradients are the *local* sums, so after the
  multi-node optimizer averages gradients the update equals single-process
  BN on the concatenated batch. Inference uses running averages (decay 0.9)
  of the global statistics, identical on every rank. No double backprop.
  On GPU the two sums go through NCCL on the device (no host copy, no host
  sync per layer; :func:`hpcsgd.comm.nccl_setup.device_allreduce`), over MPI
  otherwise; ``last_count`` is this rank's count, as in the other modes.

``eps = 1e-5`` (the Caffe2 / fb.resnet.torch value Goyal's code base used).
"""

from __future__ import annotations

import chainer
import numpy
from chainer import backend

from hpcsgd.errors import ConfigError
from hpcsgd.models import ops
from hpcsgd.runtime.watchdog import collective

MODES = ("batch", "recompute", "running", "sync")
VAR_COMBINES = ("corrected", "mean")


def _channel_axes(ndim: int) -> tuple[int, ...]:
    return (0,) + tuple(range(2, ndim))


def _bshape(ndim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (ndim - 2)


class SyncBatchNormFunction(chainer.FunctionNode):
    """BN over the global batch of all ranks; see the module docstring ('sync')."""

    def __init__(self, comm, eps: float):
        self.comm = comm
        self.eps = eps
        self.mean = None  # global batch mean (float64), for the link's running averages
        self.var = None   # global biased variance (float64)
        self.count = 0    # images per channel over all ranks

    def _allreduce(self, buf, what: str):
        """Sum ``buf`` over the ranks: NCCL on the device for CuPy arrays, else ``comm.allreduce``."""
        if not isinstance(buf, numpy.ndarray):
            from hpcsgd.comm.nccl_setup import device_allreduce

            out = device_allreduce(self.comm, buf, f"sync_bn_{what}")
            if out is not None:
                return out
        with collective(f"sync_bn_{what}", nbytes=buf.nbytes):
            return self.comm.allreduce(buf)

    def forward(self, inputs):
        x, gamma, beta = inputs
        xp = backend.get_array_module(x)
        axes = _channel_axes(x.ndim)
        c = x.shape[1]
        n_local = x.size // c
        buf = xp.concatenate([x.sum(axis=axes, dtype=numpy.float64),
                              (x.astype(numpy.float64) ** 2).sum(axis=axes),
                              xp.asarray([n_local], dtype=numpy.float64)])
        buf = self._allreduce(buf, "forward")
        count = buf[2 * c]  # stays on the device for CuPy: no host sync per layer
        mean = buf[:c] / count
        var = xp.maximum(buf[c:2 * c] / count - mean * mean, 0.0)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        bs = _bshape(x.ndim)
        xhat = ((x - mean.astype(x.dtype).reshape(bs)) * inv_std.astype(x.dtype).reshape(bs))
        y = gamma.reshape(bs) * xhat + beta.reshape(bs)
        self.mean, self.var, self.count = mean, var, count
        self._xhat = xhat
        self._inv_std = inv_std.astype(x.dtype)
        self.retain_inputs((1,))
        return y.astype(x.dtype, copy=False),

    def backward(self, indexes, grad_outputs):
        gamma = self.get_retained_inputs()[0].array
        gy = grad_outputs[0]
        xhat = self._xhat
        xp = backend.get_array_module(xhat)
        gy = xp.zeros_like(xhat) if gy is None else gy.array
        axes = _channel_axes(xhat.ndim)
        c = xhat.shape[1]
        gbeta = gy.sum(axis=axes)
        ggamma = (gy * xhat).sum(axis=axes)
        total = self._allreduce(xp.concatenate([gbeta, ggamma]).astype(numpy.float64), "backward")
        bs = _bshape(xhat.ndim)
        mean_gy = (total[:c] / self.count).astype(xhat.dtype).reshape(bs)
        mean_gy_xhat = (total[c:] / self.count).astype(xhat.dtype).reshape(bs)
        gx = (gamma * self._inv_std).reshape(bs) * (gy - mean_gy - xhat * mean_gy_xhat)
        gx = gx.astype(xhat.dtype, copy=False)  # float32 gamma with float16 x (mixed16)
        out = {0: gx, 1: ggamma.astype(gamma.dtype), 2: gbeta.astype(gamma.dtype)}
        return tuple(chainer.Variable(out[i]) for i in indexes)


class BatchNorm(chainer.Link):
    """Per-channel BN link for NCHW (or NC) inputs with a selectable evaluation-statistics mode.

    Args:
        size: number of channels C.
        mode: 'batch' | 'recompute' | 'running' | 'sync' (module docstring).
        comm: communicator; required for 'sync' (``allreduce``); 'batch', 'recompute' and
            'running' use the one given to ``prepare_for_eval``.
        decay: running-average decay for 'running' and 'sync' (0.9).
        eps: added to the variance (1e-5).
        initial_gamma: 1, or 0 for the last BN of a residual block (Goyal's zero-init).
        var_combine: 'corrected' (default) or 'mean', for mode 'batch'.
    """

    def __init__(self, size: int, mode: str = "running", comm=None, decay: float = 0.9, eps: float = 1e-5,
                 initial_gamma: float = 1.0, var_combine: str = "corrected", dtype=numpy.float32):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"bn_mode must be one of {MODES}, got {mode!r}")
        if var_combine not in VAR_COMBINES:
            raise ConfigError(f"bn var_combine must be one of {VAR_COMBINES}, got {var_combine!r}")
        if mode == "sync" and comm is None:
            raise ConfigError("bn_mode='sync' needs a communicator (pass comm=...)")
        self.size = size
        self.mode = mode
        self.comm = comm
        self.decay = decay
        self.eps = eps
        self.var_combine = var_combine
        with self.init_scope():
            self.gamma = chainer.Parameter(chainer.initializers.Constant(initial_gamma, dtype), (size,))
            self.beta = chainer.Parameter(chainer.initializers.Zero(dtype), (size,))
        for name, fill in (("avg_mean", 0.0), ("avg_var", 1.0), ("last_mean", 0.0), ("last_var", 1.0)):
            setattr(self, name, numpy.full((size,), fill, dtype=dtype))
            self.register_persistent(name)
        self.last_count = 0  # images per channel in the last training minibatch (this rank)
        self.register_persistent("last_count")
        self._accum = None  # [sum x, sum x^2, count] (float64) while recomputing
        self._step = None  # [sum n*mean, sum n*(var+mean^2), sum n*var, sum n] (float64) of this step
        self._fold = False  # fold the next forward into self._step (set by start_step)

    # -- forward ---------------------------------------------------------------
    def forward(self, x, relu: bool = False):
        if not chainer.config.train:
            return ops.fixed_batch_norm(x, self.gamma, self.beta, self.avg_mean, self.avg_var,
                                        self.eps, relu)
        xd = x.array if isinstance(x, chainer.Variable) else x
        if self.mode == "sync":
            fn = SyncBatchNormFunction(self.comm, self.eps)
            y, = fn.apply((x, self.gamma, self.beta))
            self._observe(fn.mean, fn.var, fn.count, xd.size // xd.shape[1])
            return ops.relu(y) if relu else y
        y, mean, var = ops.batch_norm(x, self.gamma, self.beta, self.eps, relu)
        self._observe(mean, var, xd.size // xd.shape[1])
        return y

    def _observe(self, mean, var, count, local_count=None) -> None:
        """Record this forward's statistics; ``count`` may be a device scalar ('sync' on GPU).

        ``local_count`` (this rank's images per channel; default ``count``) goes to
        ``last_count`` as a host int without reading a device value.
        """
        xp = backend.get_array_module(mean)
        dt = self.avg_mean.dtype
        if self.mode == "batch":
            self._observe_step(xp, mean, var, count)
        else:
            self.last_mean = xp.asarray(mean, dtype=dt)
            self.last_var = xp.asarray(var, dtype=dt)
            self.last_count = int(count if local_count is None else local_count)
        if self._accum is not None:
            m = xp.asarray(mean, dtype=numpy.float64)
            v = xp.asarray(var, dtype=numpy.float64)
            self._accum[0] += m * count
            self._accum[1] += (v + m * m) * count
            self._accum[2] += count
        if self.mode in ("running", "sync"):
            unbiased = var * (count / xp.maximum(count - 1.0, 1.0))
            d = self.decay
            self.avg_mean = xp.asarray(d * self.avg_mean + (1 - d) * xp.asarray(mean, dtype=dt), dtype=dt)
            self.avg_var = xp.asarray(d * self.avg_var + (1 - d) * xp.asarray(unbiased, dtype=dt), dtype=dt)

    # -- 'batch' mode: statistics of the whole last step -------------------------
    def start_step(self) -> None:
        """The next forwards until the next ``start_step`` are micro-batches of one step."""
        self._step, self._fold = None, True

    def _observe_step(self, xp, mean, var, count) -> None:
        m = xp.asarray(mean, dtype=numpy.float64)
        v = xp.asarray(var, dtype=numpy.float64)
        if self._step is None or not self._fold:
            self._step = [m * 0, m * 0, m * 0, 0.0]
        acc = self._step
        acc[0] = acc[0] + m * count
        acc[1] = acc[1] + (v + m * m) * count
        acc[2] = acc[2] + v * count
        acc[3] += count
        n = acc[3]
        step_mean = acc[0] / n
        if self.var_combine == "corrected":
            step_var, self.last_count = xp.maximum(acc[1] / n - step_mean * step_mean, 0.0), int(n)
        else:
            step_var, self.last_count = acc[2] / n, int(count)
        dt = self.avg_mean.dtype
        self.last_mean = step_mean.astype(dt)
        self.last_var = step_var.astype(dt)

    # -- recompute ---------------------------------------------------------------
    def start_recompute(self) -> None:
        xp = backend.get_array_module(self.avg_mean)
        self._accum = [xp.zeros(self.size, numpy.float64), xp.zeros(self.size, numpy.float64), 0.0]

    def stop_recompute(self):
        """Return this rank's [sum x, sum x^2, count] and stop accumulating."""
        acc, self._accum = self._accum, None
        return acc
