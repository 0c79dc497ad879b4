"""hpcsgd: MPI data-parallel large-minibatch training for Chainer.

ChainerMN users switch with one import::

    import hpcsgd as chainermn   # create_communicator, create_multi_node_optimizer, ...
    comm = chainermn.create_communicator("hierarchical")
    optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
    train = chainermn.scatter_dataset(train, comm, shuffle=True)
    evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)

See docs/chainermn.md for the full API and its differences from ChainerMN.

Heavy submodules are imported lazily, so ``import hpcsgd`` stays cheap and
does not initialise MPI by itself.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

from hpcsgd import gpu_compat as _gpu_compat  # noqa: E402  (before anything imports chainer/cupy)

_gpu_compat.apply()  # CuPy 13 + the CUDA wheels' libraries for Chainer 7.8.1; a no-op without CuPy

_LAZY = {
    "create_communicator": "hpcsgd.comm",
    "create_multi_node_optimizer": "hpcsgd.optim",
    "create_topology": "hpcsgd.runtime.topology",
    "get_tracer": "hpcsgd.runtime.trace",
    # ChainerMN's training-script API (hpcsgd.chainermn_api)
    "scatter_dataset": "hpcsgd.chainermn_api",
    "scatter_index": "hpcsgd.chainermn_api",
    "create_empty_dataset": "hpcsgd.chainermn_api",
    "DataSizeError": "hpcsgd.chainermn_api",
    "create_multi_node_evaluator": "hpcsgd.chainermn_api",
    "create_multi_node_checkpointer": "hpcsgd.chainermn_api",
    "create_multi_node_iterator": "hpcsgd.chainermn_api",
    "MultiNodeBatchNormalization": "hpcsgd.chainermn_api",
    "global_except_hook": "hpcsgd.chainermn_api",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcsgd' has no attribute {name!r}")


__all__ = list(_LAZY)

# ChainerMN installs its abort-on-exception hook at import when asked to; so does hpcsgd.
if os.environ.get("CHAINERMN_FORCE_ABORT_ON_EXCEPTION"):
    from hpcsgd.chainermn_api import global_except_hook as _hook

    _hook.add_hook()
