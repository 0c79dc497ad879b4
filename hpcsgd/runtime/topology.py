"""Where every rank sits: world rank, node, rank within the node, GPU.

The topology is derived once from an MPI communicator (``MPI.COMM_WORLD`` by
default) and drives every hierarchical algorithm in :mod:`hpcsgd.comm`:

* ``intra_comm``: the ranks of this node (``Split_type(COMM_TYPE_SHARED)``), so
  they can share memory. ``intra_rank``/``intra_size`` index it.
* ``inter_comm``: the ranks that have the same ``intra_rank`` on every node,
  ordered by node. ``inter_rank`` is the node index, ``inter_size`` the node
  count. In the hierarchical allreduce, shard ``i`` of the gradients crosses the
  network only among the ranks with ``intra_rank == i``.
* ``device``: the GPU this rank drives, or ``-1``: ``local_rank % n_gpus``, where
  ``local_rank`` is the rank within the *physical* node (:func:`select_gpu`).

Virtual nodes
-------------
``HPCSGD_RANKS_PER_NODE=k`` splits every physical node into pretend nodes of
``k`` consecutive ranks, so that ``mpiexec -n 4`` on one machine exercises the
inter-node paths with 2 nodes x 2 ranks. The pretend nodes stay inside one
physical node, so their shared-memory windows still work. They add no GPUs:
devices are assigned from the physical node-local rank, and two ranks that
would drive the same GPU are refused (NCCL cannot place two ranks of one
communicator on one device).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from mpi4py import MPI

from hpcsgd.runtime.envvars import env_number

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
    local_rank: int = 0  # rank within the physical node (differs from intra_rank on virtual nodes)
    local_size: int = 1  # ranks on the physical node

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
            "local_rank": self.local_rank,
            "hostname": self.hostname,
        }

    def free(self) -> None:
        for c in (self.intra_comm, self.inter_comm):
            if c is not None and c != MPI.COMM_NULL:
                c.Free()
        self.intra_comm = self.inter_comm = None


def _ranks_per_node_from_env() -> int | None:
    return env_number(RANKS_PER_NODE_ENV, int, 1, "ranks per node")


def _gpu_bus_ids() -> list[str]:
    """PCI bus id of every GPU this process sees, in CUDA order ([] without CuPy or a device)."""
    try:
        import cupy

        rt = cupy.cuda.runtime
        return [str(rt.deviceGetPCIBusId(i)) for i in range(int(rt.getDeviceCount()))]
    except Exception:
        return []


def select_gpu(comm=None, bus_ids: list[str] | None = None, node_comm=None) -> int:
    """The GPU this rank drives: ``local_rank % n_gpus`` on its physical node (collective over ``comm``).

    Why the physical node-local rank: virtual nodes (``HPCSGD_RANKS_PER_NODE``)
    restart ``intra_rank`` at 0 on every pretend node, so ranks of one machine
    would pick the same GPU. Each rank's GPU is identified by its PCI bus id and
    compared across the machine: two ranks on one device (more ranks than GPUs,
    or a launcher that shows every rank the same GPU) raise the same
    ``RuntimeError`` on every rank, as NCCL cannot put two ranks of one
    communicator on one GPU. A launcher that binds one GPU per rank
    (``CUDA_VISIBLE_DEVICES`` differs per rank) gives device 0 everywhere, which
    is fine: the bus ids differ.

    Args:
        comm: an mpi4py communicator (``MPI.COMM_WORLD`` when None).
        bus_ids: the PCI bus ids of the GPUs this rank sees (queried from CuPy when None).
        node_comm: the ranks of this physical node (``Split_type(COMM_TYPE_SHARED)`` when None).
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    own_node = node_comm is None
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank()) if own_node else node_comm
    try:
        ids = _gpu_bus_ids() if bus_ids is None else list(bus_ids)
        device = node.Get_rank() % len(ids) if ids else -1
        mine = ids[device] if ids else None
        on_node = node.allgather((comm.Get_rank(), mine))
    finally:
        if own_node:
            node.Free()
    problem = None
    if mine is None:
        problem = (f"rank {comm.Get_rank()} on {socket.gethostname()} sees no CUDA device "
                   f"(is CuPy installed, CUDA_VISIBLE_DEVICES set?)")
    else:
        sharing = [r for r, b in on_node if b == mine]
        if len(sharing) > 1:
            problem = (f"ranks {sharing} on {socket.gethostname()} would share the GPU at PCI {mine}: "
                       f"{len(on_node)} ranks on this machine, {len(ids)} GPU(s) visible to rank "
                       f"{comm.Get_rank()}; start at most one rank per GPU (virtual nodes from "
                       f"{RANKS_PER_NODE_ENV} add no GPUs)")
    problems = [p for p in comm.allgather(problem) if p]
    if problems:
        raise RuntimeError("no GPU of its own for every rank: " + "; ".join(problems[:4]))
    return device


def create_topology(comm=None, ranks_per_node: int | None = None, use_gpu: bool = False) -> Topology:
    """Derive the rank placement from ``comm`` (collective over ``comm``).

    Args:
        comm: an mpi4py communicator; ``MPI.COMM_WORLD`` when None.
        ranks_per_node: split physical nodes into virtual nodes of this many
            ranks; defaults to ``$HPCSGD_RANKS_PER_NODE`` (unset: no split).
        use_gpu: assign a GPU to each rank (:func:`select_gpu`: physical node-local
            rank modulo the visible GPUs; two ranks on one GPU raise).
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    k = ranks_per_node if ranks_per_node is not None else _ranks_per_node_from_env()

    physical = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = physical.Get_rank(), physical.Get_size()
    try:
        device = select_gpu(comm, node_comm=physical) if use_gpu else -1
    except BaseException:
        physical.Free()
        raise
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
        local_rank=local_rank,
        local_size=local_size,
    )
