"""Ranks for tests/test_shm_layout.py: placement and visibility of :class:`SharedSegments`.

Checks, on every rank of every (virtual) node: each segment starts at a multiple
of ``SEGMENT_ALIGN`` bytes from segment 0, at the same page offset in every
rank's mapping, and at a 64-byte-aligned address; segments do not overlap; the
owner's first touch leaves zeros; after a fence every rank reads exactly what
each owner wrote (a seeded pattern per owner), also when the owner arrives late
(the others then sleep in the fence) and over many fences with seeded random
skew; a custom ``align`` and an empty segment work.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from hpcsgd.comm.shm import SEGMENT_ALIGN, SharedSegments
from hpcsgd.runtime.topology import create_topology

world = MPI.COMM_WORLD
topo = create_topology(world)
node = topo.intra_comm


def pattern(owner: int, count: int) -> np.ndarray:
    return np.random.default_rng(1000 + owner).standard_normal(count).astype(np.float32)


def check(count: int, align: int, dtype=np.float32) -> None:
    shm = SharedSegments(node, count, dtype, align=align)
    try:
        assert all(s.size == count and s.dtype == np.dtype(dtype) for s in shm.segments)
        assert shm.stride % align == 0 and shm.stride >= count * np.dtype(dtype).itemsize
        if count == 0:  # an empty array's address means nothing
            shm.fence()
            return
        addrs = [s.ctypes.data for s in shm.segments]
        assert [a - addrs[0] for a in addrs] == [i * shm.stride for i in range(len(addrs))], addrs
        assert all(a % 64 == 0 for a in addrs), [a % 64 for a in addrs]
        offsets = node.allgather(addrs[0] % 4096)
        assert len(set(offsets)) == 1, f"page offset differs between ranks: {offsets}"
        assert not shm.mine.any(), "first touch must leave zeros"
        shm.fence()
        for s in shm.segments:
            assert not s.any(), "a peer's segment is not zero after the first touch"
        shm.fence()
        if node.Get_rank() == 0:
            time.sleep(0.05)  # the others wait in the fence (spin, then sleep)
        shm.mine[:] = pattern(node.Get_rank(), count).astype(dtype)
        shm.fence()
        for owner, s in enumerate(shm.segments):
            np.testing.assert_array_equal(s, pattern(owner, count).astype(dtype), err_msg=f"owner {owner}")
        shm.fence()
        skew = np.random.default_rng(7 + world.Get_rank()).uniform(0, 200e-6, 300)
        for i, delay in enumerate(skew):  # every fence orders the writes before it
            time.sleep(delay)
            shm.mine[:16] = i
            shm.fence()
            for owner, s in enumerate(shm.segments):
                assert (s[:16] == i).all(), (i, owner, s[:16])
            shm.fence()
    finally:
        shm.free()


check(25_557_096 // 64, SEGMENT_ALIGN)  # a size that is not a multiple of a page
check(1000, 4096, np.uint16)
check(0, SEGMENT_ALIGN)
check(64, 4096, np.int16)
print(f"rank {world.Get_rank()}: shm checks passed (node of {node.Get_size()})", flush=True)
