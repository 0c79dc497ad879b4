"""Communicators: how ranks average gradients and move arrays (ChainerMN-compatible).

``create_communicator(name)`` builds one; every class implements
:class:`~hpcsgd.comm.base.CommunicatorBase`. One algorithm per module:

============== ========================================== ===== ===== ==============================
name           gradient mean (``multi_node_mean_grad``)   CPU   GPU   wire dtypes
============== ========================================== ===== ===== ==============================
naive          one MPI Allreduce per parameter (ChainerMN  yes   no    float32 (float16 grads widened)
               CPU baseline)
flat           one MPI Allreduce of the packed buffer,     yes   no    float32, float16
               in buckets
hierarchical   reduce-scatter in the node (shared memory   yes   yes   intra float32; inter float16
(default)      on CPU, NCCL on GPU), allreduce of each                 (float32 accumulation) or
               shard between nodes, allgather in the node              float32
nccl           one NCCL allreduce of the packed buffer     no    yes   float16, float32 (bfloat16)
               (ChainerMN ``pure_nccl``)
dummy          pack and unpack only, no communication      yes   yes   any (benchmarks only: the
               (measures packing cost)                                 result is not the mean)
============== ========================================== ===== ===== ==============================

Classes are imported only when requested, so ``import hpcsgd.comm`` does not
initialise MPI.
"""

from __future__ import annotations

import importlib
from typing import Any

#: communicator name -> (module, class)
COMMUNICATORS: dict[str, tuple[str, str]] = {
    "naive": ("hpcsgd.comm.naive", "NaiveCommunicator"),
    "flat": ("hpcsgd.comm.flat", "FlatCommunicator"),
    "hierarchical": ("hpcsgd.comm.hierarchical", "HierarchicalCommunicator"),
    "nccl": ("hpcsgd.comm.nccl", "NcclCommunicator"),
    "dummy": ("hpcsgd.comm.dummy", "DummyCommunicator"),
}

_LAZY = {
    "CommunicatorBase": "hpcsgd.comm.base",
    "MpiCommunicatorBase": "hpcsgd.comm.mpi_base",
}


def communicator_class(name: str) -> type:
    """The class registered as ``name`` (imports its module); ValueError lists the names."""
    if name not in COMMUNICATORS:
        raise ValueError(f"unknown communicator {name!r}; choose one of {', '.join(COMMUNICATORS)}")
    module, cls = COMMUNICATORS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ValueError(f"communicator {name!r} is registered but {module} is not installed") from e
    return getattr(mod, cls)


def create_communicator(communicator_name: str = "hierarchical", mpi_comm=None,
                        allreduce_grad_dtype=None, batched_copy: bool = True, *,
                        name: str | None = None, **config: Any):
    """Create a communicator over ``mpi_comm`` (``MPI.COMM_WORLD`` when None). Collective.

    Args:
        communicator_name: one of ``COMMUNICATORS`` (see the table in this module).
            ``name=`` is accepted as the hpcsgd spelling of the same argument.
        mpi_comm: an mpi4py communicator; the communicator works on a duplicate.
        allreduce_grad_dtype: wire dtype of the gradients ('float16', 'float32',
            numpy dtypes accepted); None lets the algorithm choose its measured default.
        batched_copy: pack/unpack all gradients in one fused pass (ChainerMN's option).
        **config: further config options, e.g. ``intra_dtype``, ``inter_dtype``,
            ``bucket_bytes``, ``check_finite``, ``half_scaling`` (float16 wire: 'chunk', a
            power-of-two scale per message, or 'predivide'); unknown names raise ValueError.
    """
    if name is not None:
        if communicator_name not in ("hierarchical", name):
            raise ValueError(f"create_communicator: got both communicator_name={communicator_name!r} "
                             f"and name={name!r}")
        communicator_name = name
    cls = communicator_class(communicator_name)
    if allreduce_grad_dtype is not None:
        config["allreduce_grad_dtype"] = allreduce_grad_dtype
    config.setdefault("batched_copy", batched_copy)
    return cls(mpi_comm=mpi_comm, **config)


def __getattr__(attr: str):
    if attr in _LAZY:
        return getattr(importlib.import_module(_LAZY[attr]), attr)
    raise AttributeError(f"module 'hpcsgd.comm' has no attribute {attr!r}")


__all__ = ["COMMUNICATORS", "communicator_class", "create_communicator", *_LAZY]
