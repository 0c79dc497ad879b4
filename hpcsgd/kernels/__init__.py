"""hpcsgd's fused CPU kernels for NumPy training, behind one switch.

    import hpcsgd.kernels
    hpcsgd.kernels.enable()            # NumPy inputs now take the fast kernels
    hpcsgd.kernels.enable(threads=2)   # ... and BLAS + numba run 2 threads per rank
    hpcsgd.kernels.enable(False)       # back to Chainer's functions

:func:`enable` swaps entries of :data:`hpcsgd.models.ops.CPU_IMPL`; CuPy
inputs keep Chainer's cuDNN functions whatever the switch says. Calling it
again with the same arguments is a no-op.
"""

from __future__ import annotations

from hpcsgd.kernels.threads import current_threads, default_threads, set_threads

__all__ = ["enable", "enabled", "set_threads", "default_threads", "current_threads", "KERNEL_IMPL"]


def _kernel_impl() -> dict:
    from hpcsgd.kernels import batchnorm, conv, eltwise, pool

    return {
        "conv2d": conv.conv2d,
        "batch_norm": batchnorm.batch_norm,
        "fixed_batch_norm": batchnorm.fixed_batch_norm,
        "add_relu": eltwise.add_relu,
        "relu": eltwise.relu,
        # used once ops offers it: max_pool2d(x, ksize, stride, pad), cover_all=False
        "max_pool2d": pool.max_pool2d,
    }


KERNEL_IMPL: dict = {}


def enable(on: bool = True, threads: int | None = None) -> bool:
    """Switch hpcsgd's NumPy kernels on (or off with ``on=False``); returns the new state.

    ``threads``: threads per rank for BLAS and numba together (see
    :func:`hpcsgd.kernels.threads.set_threads`); ``None`` leaves the thread
    settings as they are. Switching on also keeps freed memory in the process
    (:mod:`hpcsgd.kernels.memory`; ``HPCSGD_KEEP_FREED_MEMORY=0`` opts out).
    """
    from hpcsgd.kernels.memory import keep_freed_memory
    from hpcsgd.models import ops

    if threads is not None:
        set_threads(threads)
    if on:
        keep_freed_memory()
        if not KERNEL_IMPL:
            # only the ops this version of hpcsgd.models.ops dispatches
            KERNEL_IMPL.update({k: f for k, f in _kernel_impl().items() if k in ops.CHAINER_IMPL})
        ops.CPU_IMPL.update(KERNEL_IMPL)
    else:
        ops.CPU_IMPL.update(ops.CHAINER_IMPL)
    return enabled()


def enabled() -> bool:
    """True when every op of :mod:`hpcsgd.models.ops` takes hpcsgd's kernel on NumPy inputs."""
    from hpcsgd.models import ops

    return bool(KERNEL_IMPL) and all(ops.CPU_IMPL.get(k) is v for k, v in KERNEL_IMPL.items())
