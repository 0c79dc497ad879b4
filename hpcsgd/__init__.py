"""hpcsgd: MPI data-parallel large-minibatch training for Chainer.

ChainerMN users switch with one import::

    import hpcsgd as chainermn   # create_communicator, create_multi_node_optimizer, ...
    comm = chainermn.create_communicator("hierarchical")
    optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)

Heavy submodules are imported lazily, so ``import hpcsgd`` stays cheap and
does not initialise MPI by itself.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hpcsgd import gpu_compat as _gpu_compat  # noqa: E402  (before anything imports chainer/cupy)

_gpu_compat.apply()  # CuPy 13 + the CUDA wheels' libraries for Chainer 7.8.1; a no-op without CuPy

_LAZY = {
    "create_communicator": "hpcsgd.comm",
    "create_multi_node_optimizer": "hpcsgd.optim",
    "create_topology": "hpcsgd.topology",
    "get_tracer": "hpcsgd.trace",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcsgd' has no attribute {name!r}")


__all__ = list(_LAZY)
