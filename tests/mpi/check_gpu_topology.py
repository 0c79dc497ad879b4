"""Ranks for tests/test_gpu_topology.py: GPU choice from the physical node-local rank.

Stand-in PCI bus ids replace CuPy's device query, so the logic runs without a GPU.
Run with HPCSGD_RANKS_PER_NODE=1: every rank is then intra_rank 0 of its own
virtual node, which is what made two ranks pick the same GPU.
"""

import pytest
from mpi4py import MPI

import hpcsgd.runtime.topology as T

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def expect_error(bus_ids, *needles):
    with pytest.raises(RuntimeError) as info:
        T.select_gpu(comm, bus_ids=bus_ids)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


# one GPU per rank on the machine: device = physical local rank, although intra_rank is 0 everywhere
gpus = [f"0000:{i:02x}:00.0" for i in range(size)]
assert T.select_gpu(comm, bus_ids=gpus) == rank
T._gpu_bus_ids = lambda: gpus  # what CuPy would report
topo = T.create_topology(comm, use_gpu=True)
assert topo.virtual_nodes and topo.intra_rank == 0 and topo.inter_size == size
assert (topo.device, topo.local_rank, topo.local_size) == (rank, rank, size), topo.describe()
assert topo.describe()["local_rank"] == rank
topo.free()

if size > 1:  # more ranks than GPUs: refused on every rank, naming the ranks and the cause
    expect_error(gpus[:1], "would share the GPU", "HPCSGD_RANKS_PER_NODE")
    expect_error(["0000:01:00.0"], "would share the GPU")  # a launcher shows every rank the same GPU
else:
    assert T.select_gpu(comm, bus_ids=gpus[:1]) == 0
# a launcher that binds one GPU per rank (each sees one, a different one): device 0, no error
assert T.select_gpu(comm, bus_ids=[f"0000:{rank + 10:02x}:00.0"]) == 0
# the last rank sees no GPU: every rank raises, naming it
expect_error(gpus if rank != size - 1 else [], f"rank {size - 1} on", "sees no CUDA device")
comm.Barrier()
print(f"rank {rank} ok")
