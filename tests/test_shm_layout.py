"""Shared-memory placement and the shard cut of the hierarchical allreduce.

``shard_bounds`` is checked against its definition (a partition of the bucket, inner
cuts at multiples of 16 elements, shards within 16 elements of equal); the real
window (tests/mpi/check_shm.py) on 1, 2 and 4 ranks, and on 2 virtual nodes of 2.
Bitwise agreement of the hierarchical algorithm with its replay
(``hpcsgd.comm.fp16_model``, same cut) is checked by tests/test_fp16_wire.py.
"""

import numpy as np
import pytest

from hpcsgd.comm.bucket_algorithm import SHARD_ALIGN, shard_bounds


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_shard_bounds_partition_aligned_near_equal(k):
    rng = np.random.default_rng(k)
    cases = [(0, 0), (0, 5), (0, 16 * k), (3, 100), (0, 4194304), (25165824, 25557096)]
    cases += [tuple(sorted(map(int, rng.integers(0, 10**6, 2)))) for _ in range(50)]
    for lo, hi in cases:
        bounds = [shard_bounds(lo, hi, k, s) for s in range(k)]
        assert bounds[0][0] == lo and bounds[-1][1] == hi
        assert all(a <= b for a, b in bounds)
        assert all(bounds[s][1] == bounds[s + 1][0] for s in range(k - 1))
        inner = [b for _, b in bounds[:-1]]
        assert all(c % SHARD_ALIGN == 0 or c in (lo, hi) for c in inner), (lo, hi, inner)
        for s, (a, b) in enumerate(bounds):  # within one alignment step of the equal cut
            assert abs(a - (lo + (hi - lo) * s // k)) < SHARD_ALIGN
            assert abs(b - (lo + (hi - lo) * (s + 1) // k)) < SHARD_ALIGN


def test_shard_bounds_unchanged_where_the_equal_cut_is_aligned():
    """16 MiB buckets of float32 on 2/4/8 ranks: the cut is the plain equal split."""
    for k in (2, 4, 8):
        for lo in (0, 4194304):
            hi = lo + 4194304
            assert [shard_bounds(lo, hi, k, s) for s in range(k)] == \
                [(lo + 4194304 * s // k, lo + 4194304 * (s + 1) // k) for s in range(k)]


@pytest.mark.mpi
@pytest.mark.parametrize("script,passed", [("tests/mpi/check_shm.py", "shm checks passed"),
                                           ("tests/mpi/check_shm_probe.py", "shm probe checks passed")])
@pytest.mark.parametrize("n,per_node", [(1, None), (2, None), (4, None), (4, "2")])
def test_shared_segments_and_the_round_trip_probe(mpirun, script, passed, n, per_node):
    """check_shm: placement and visibility of the window; check_shm_probe: the core-to-core
    probe and the node bucket size it picks (see those files' docstrings)."""
    env = {"HPCSGD_RANKS_PER_NODE": per_node} if per_node else {}
    res = mpirun(script, n, env=env, timeout=180)
    assert res.stdout.count(passed) == n, res.stdout + res.stderr
