"""Where every rank sits: world rank, node, rank within the node, GPU.

The topology is derived once from an MPI communicator (``MPI.COMM_WORLD`` by
default) and drives every hierarchical algorithm in :mod:`hpcsgd.comm`:

* ``intra_comm``: the ranks of this node (``Split_type(COMM_TYPE_SHARED)``), so
  they can share memory. ``intra_rank``/``intra_size`` index it.
* ``inter_comm``: the ranks that have the same ``intra_rank`` on every node,
  ordered by node. ``inter_rank`` is the node index, ``inter_size`` the node
  count. In the hierarchical allreduce, shard ``i`` of the gradients crosses the
  network only among the ranks with ``intra_rank == i``.
* ``device``: the GPU this rank drives (``intra_rank % n_gpus``), or ``-1``.

Virtual nodes
-------------
``HPCSGD_RANKS_PER_NODE=k`` splits every physical node into pretend nodes of
``k`` consecutive ranks, so that ``mpiexec -n 4`` on one machine exercises the
inter-node paths with 2 nodes x 2 ranks. The pretend nodes stay inside one
physical node, so their shared-memory windows still work.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from mpi4py import MPI

from hpcsgd.envvars import env_number

RANKS_PER_NODE_ENV = "HPCSGD_RANKS_PER_NODE"


@dataclass
class Topology:
    """Rank placement; all attributes are plain ints except the communicators."""

    comm: Any
    rank: int
    size: int
    intra_comm: Any
    intra_rank: int
    intra_size: int
    inter_comm: Any
    inter_rank: int
    inter_size: int
    device: int = -1
    hostname: str = field(default_factory=socket.gethostname)
    uniform: bool = True  # every node has the same number of ranks
    virtual_nodes: bool = False

    @property
    def n_nodes(self) -> int:
        return self.inter_size

    def describe(self) -> dict:
        """A JSON-friendly summary (used by ``--dry-run`` and ``summary.json``)."""
        return {
            "size": self.size,
            "nodes": self.inter_size,
            "ranks_per_node": self.intra_size,
            "uniform": self.uniform,
            "virtual_nodes": self.virtual_nodes,
            "device": self.device,
            "hostname": self.hostname,
        }

    def free(self) -> None:
        for c in (self.intra_comm, self.inter_comm):
            if c is not None and c != MPI.COMM_NULL:
                c.Free()
        self.intra_comm = self.inter_comm = None


def _ranks_per_node_from_env() -> int | None:
    return env_number(RANKS_PER_NODE_ENV, int, 1, "ranks per node")


def _gpu_count() -> int:
    try:
        import cupy  # noqa: F401

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def create_topology(comm=None, ranks_per_node: int | None = None, use_gpu: bool = False) -> Topology:
    """Derive the rank placement from ``comm`` (collective over ``comm``).

    Args:
        comm: an mpi4py communicator; ``MPI.COMM_WORLD`` when None.
        ranks_per_node: split physical nodes into virtual nodes of this many
            ranks; defaults to ``$HPCSGD_RANKS_PER_NODE`` (unset: no split).
        use_gpu: assign a GPU id to each rank (``intra_rank % n_gpus``).
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    k = ranks_per_node if ranks_per_node is not None else _ranks_per_node_from_env()

    physical = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    if k is not None:
        intra = physical.Split(color=physical.Get_rank() // k, key=rank)
        physical.Free()
    else:
        intra = physical
    intra_rank, intra_size = intra.Get_rank(), intra.Get_size()

    # Node index: order nodes by their lowest world rank.
    leader = intra.bcast(rank, root=0)
    leaders = sorted(set(comm.allgather(leader)))
    inter_rank = leaders.index(leader)
    inter_size = len(leaders)
    sizes = comm.allgather(intra_size)
    uniform = len(set(sizes)) == 1
    inter = comm.Split(color=intra_rank, key=inter_rank)

    device = -1
    if use_gpu:
        n = _gpu_count()
        if n == 0:
            raise RuntimeError("use_gpu=True but no CUDA device is visible (is cupy installed?)")
        device = intra_rank % n
    return Topology(
        comm=comm,
        rank=rank,
        size=size,
        intra_comm=intra,
        intra_rank=intra_rank,
        intra_size=intra_size,
        inter_comm=inter,
        inter_rank=inter_rank,
        inter_size=inter_size,
        device=device,
        uniform=uniform,
        virtual_nodes=k is not None,
    )
