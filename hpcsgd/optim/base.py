"""Shared plumbing for hpcsgd's Chainer update rules.

Each rule writes its step once with array-module-generic code (``xp`` is
NumPy or CuPy), so the same arithmetic runs on CPU and GPU; the float64
hand-computed references in ``tests/test_optim.py`` check it.
"""

from __future__ import annotations

from chainer import optimizer


class XpUpdateRule(optimizer.UpdateRule):
    """An UpdateRule whose CPU and GPU paths are the same ``step(xp, param, grad)``."""

    def step(self, xp, param, grad) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_core_cpu(self, param):
        if param.grad is None:
            return
        import numpy

        self.step(numpy, param, param.grad)

    def update_core_gpu(self, param):
        if param.grad is None:
            return
        from chainer.backends import cuda

        self.step(cuda.cupy, param, param.grad)


class LrTrackingRule(XpUpdateRule):
    """Remembers the LR of its previous applied step (``lr_prev``, 0 before the first).

    ``lr_prev`` is saved with the optimizer state (``serialize``), so a run
    resumed from a checkpoint applies the same momentum correction as an
    uninterrupted one.
    """

    def __init__(self, parent_hyperparam=None):
        super().__init__(parent_hyperparam)
        self.lr_prev = 0.0

    def serialize(self, serializer):
        super().serialize(serializer)
        try:
            value = serializer("lr_prev", self.lr_prev)
        except KeyError:  # a snapshot written by a plain Chainer optimizer
            value = self.lr_prev
        if value is not None:
            self.lr_prev = float(value)


def as_scalar(value, dtype):
    """``value`` as a NumPy scalar of ``dtype`` (keeps float32 arithmetic float32)."""
    import numpy

    return numpy.dtype(dtype).type(value)


__all__ = ["XpUpdateRule", "LrTrackingRule", "as_scalar"]
