"""ChainerMN's training-script API on hpcsgd communicators (``import hpcsgd as chainermn``).

One concept per module:

* :mod:`.datasets`: ``scatter_dataset``, ``scatter_index``, ``create_empty_dataset``;
* :mod:`.evaluator`: ``create_multi_node_evaluator`` (mean of the ranks' results);
* :mod:`.checkpointer`: ``create_multi_node_checkpointer`` (per-rank generational npz files);
* :mod:`.batchnorm`: ``MultiNodeBatchNormalization`` (hpcsgd's sync BN behind ChainerMN's signature);
* :mod:`.iterator`: ``create_multi_node_iterator`` (rank_master's batches on every rank);
* :mod:`.global_except_hook`: ``add_hook()`` aborts the MPI job on an uncaught exception
  (hpcsgd.runtime.abort).

Semantics follow ChainerMN 7.8; where hpcsgd differs (clear errors instead of
asserts or hangs, dtypes kept) the module docstring says so. docs/chainermn.md
lists every difference.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "scatter_dataset": "datasets",
    "scatter_index": "datasets",
    "create_empty_dataset": "datasets",
    "DataSizeError": "datasets",
    "create_multi_node_evaluator": "evaluator",
    "create_multi_node_checkpointer": "checkpointer",
    "MultiNodeBatchNormalization": "batchnorm",
    "create_multi_node_iterator": "iterator",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name == "global_except_hook":
        return importlib.import_module(f"{__name__}.global_except_hook")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY, "global_except_hook"]
