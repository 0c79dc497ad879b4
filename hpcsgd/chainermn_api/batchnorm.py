"""``MultiNodeBatchNormalization``: hpcsgd's sync BN behind ChainerMN's name and signature.

Training normalizes with the mean and variance of the *global* batch (all ranks;
:class:`hpcsgd.models.batchnorm.SyncBatchNormFunction`: one allreduce of
per-channel sums in float64 forward, one backward), so unequal per-rank batches
are exact. Inference uses the running averages ``avg_mean``/``avg_var``
(``decay``; unbiased variance of the global batch), identical on every rank.

ChainerMN's arguments and their meaning here:

* ``size``: number of channels (axis 1 of an NC or NCHW input); an int or a 1-tuple;
* ``decay``, ``eps`` (default ``2e-5`` as in ChainerMN), ``dtype`` (parameter and
  statistics dtype; ``chainer.mixed16`` maps to float32);
* ``use_gamma``/``use_beta``: False replaces the parameter by the constant 1 / 0;
* ``initial_gamma``/``initial_beta``: scalars or Chainer initializers;
* ``communication_backend``: 'auto', 'mpi' or 'nccl'; the communicator's ``allreduce``
  carries the statistics whatever the value ('nccl' is refused unless the
  communicator is hpcsgd's 'nccl' one, as ChainerMN refuses it without NCCL);
* ``__call__(x, finetune=False)``: with ``finetune`` the running averages are the
  cumulative mean (``decay = 1 - 1/N``) since ``start_finetuning()``.

Gradients of gamma and beta are the rank's *local* sums; the multi-node
optimizer's mean over ranks makes the update that of BN on the global batch
(ChainerMN averages them inside the layer; after the optimizer's mean both give
the same gradient). ``avg_var`` starts at 0 as in ChainerMN.
"""

from __future__ import annotations

import copy

import chainer
import numpy
from chainer import initializers

from hpcsgd.models import ops
from hpcsgd.models.batchnorm import BatchNorm, SyncBatchNormFunction

BACKENDS = ("auto", "mpi", "nccl")


def _channels(size) -> int:
    if isinstance(size, (tuple, list)):
        if len(size) != 1:
            raise ValueError(f"MultiNodeBatchNormalization: size must be the channel count "
                             f"(an int or 1-tuple), got {size!r}")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, (int, numpy.integer)) or size <= 0:
        raise ValueError(f"MultiNodeBatchNormalization: size must be a positive int, got {size!r}")
    return int(size)


class MultiNodeBatchNormalization(BatchNorm):
    """See the module docstring."""

    def __init__(self, size, comm, decay: float = 0.9, eps: float = 2e-5, dtype=None,
                 use_gamma: bool = True, use_beta: bool = True, initial_gamma=None, initial_beta=None,
                 communication_backend: str = "auto"):
        if communication_backend not in BACKENDS:
            raise ValueError(f"communication_backend must be one of {BACKENDS}, "
                             f"got {communication_backend!r}")
        if communication_backend == "nccl" and type(comm).__name__ != "NcclCommunicator":
            raise ValueError(f"communication_backend='nccl' needs hpcsgd's 'nccl' communicator, "
                             f"got {type(comm).__name__}")
        c = _channels(size)
        dt = numpy.dtype(chainer.get_dtype(dtype, map_mixed16=numpy.float32))
        super().__init__(c, mode="sync", comm=comm, decay=decay, eps=eps, dtype=dt)
        self.avg_var[...] = 0
        # ChainerMN's persistents are avg_mean, avg_var and N: snapshots stay interchangeable.
        for name in ("last_mean", "last_var", "last_count"):
            self._persistent.discard(name)
        self.N = 0
        self.register_persistent("N")
        self.use_gamma, self.use_beta = use_gamma, use_beta
        for pname, use, init, default in (("gamma", use_gamma, initial_gamma, 1),
                                          ("beta", use_beta, initial_beta, 0)):
            if not use:
                delattr(self, pname)
                continue
            initializer = initializers._get_initializer(default if init is None else init)
            initializer.dtype = dt
            getattr(self, pname).initializer = initializer
            getattr(self, pname).initialize((c,))

    def _constant(self, value: float):
        return chainer.Variable(self.xp.full((self.size,), value, dtype=self.avg_mean.dtype))

    def forward(self, x, finetune: bool = False):
        gamma = self.gamma if self.use_gamma else self._constant(1.0)
        beta = self.beta if self.use_beta else self._constant(0.0)
        if not chainer.config.train:
            return ops.fixed_batch_norm(x, gamma, beta, self.avg_mean, self.avg_var, self.eps)
        decay = self.decay
        if finetune:
            self.N += 1
            self.decay = 1.0 - 1.0 / self.N
        try:
            fn = SyncBatchNormFunction(self.comm, self.eps)
            y, = fn.apply((x, gamma, beta))
            self._observe(fn.mean, fn.var, fn.count)
        finally:
            self.decay = decay
        return y

    def start_finetuning(self) -> None:
        """Restart the cumulative averages of ``finetune=True`` calls."""
        self.N = 0

    def __deepcopy__(self, memo):
        # The copy shares the communicator (a communicator cannot be copied).
        memo = dict(memo)
        memo[id(self.comm)] = self.comm
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


__all__ = ["MultiNodeBatchNormalization"]
