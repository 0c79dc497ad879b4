"""Ranks for tests/test_shm_layout.py: the core-to-core probe and the node bucket size it picks.

``round_trip_ns`` returns the same finite, positive value on every rank of a node
(0 on a one-rank node); the hierarchical communicator uses an explicit
``bucket_bytes`` as given (no probe), and otherwise one of its two sizes, the
same on every rank, chosen by the probe's threshold; the mean is still the
float64 reference's.
"""

from __future__ import annotations

import chainer
import numpy as np
from mpi4py import MPI

import hpcsgd
from hpcsgd.comm.hierarchical import HierarchicalCommunicator
from hpcsgd.comm.shm import round_trip_ns
from hpcsgd.runtime.topology import create_topology

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
node = create_topology(world).intra_comm

rt = round_trip_ns(node)
assert len(set(node.allgather(rt))) == 1, "ranks of a node disagree on the round trip"
if node.Get_size() == 1:
    assert rt == 0.0, rt
else:
    assert 0.0 < rt < float("inf"), rt


def model():
    link = chainer.Link()
    with link.init_scope():
        link.w = chainer.Parameter(np.zeros(5000, np.float32))
    link.w.grad = np.full(5000, float(rank), np.float32)
    return link


explicit = hpcsgd.create_communicator("hierarchical", bucket_bytes=1 << 20)
assert explicit.node_bucket_bytes() == 1 << 20 and not hasattr(explicit, "node_round_trip_ns")
auto = hpcsgd.create_communicator("hierarchical")
m = model()
auto.multi_node_mean_grad(m)
np.testing.assert_array_equal(m.w.grad, np.full(5000, (size - 1) / 2, np.float32))
chosen = auto.node_bucket_bytes()
assert chosen in (HierarchicalCommunicator.NEAR_BUCKET_BYTES, 16 << 20), chosen
if create_topology(world).inter_size == 1 and node.Get_size() > 1:
    near = auto.node_round_trip_ns < HierarchicalCommunicator.NEAR_ROUND_TRIP_NS
    assert chosen == (HierarchicalCommunicator.NEAR_BUCKET_BYTES if near else 16 << 20)
assert len(set(world.allgather(chosen))) == 1, "ranks chose different bucket sizes"
print(f"rank {rank}: shm probe checks passed (round trip {rt:.0f} ns, bucket {chosen})", flush=True)
