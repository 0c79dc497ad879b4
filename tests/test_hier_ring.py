"""The hierarchical allreduce's two staging slots per rank, under skewed ranks (tests/mpi/check_hier_ring.py).

2 and 4 ranks on one node, and 4 ranks as 2 virtual nodes of 2 (the slot also holds
the shard sent between nodes). Every call's mean is checked against float64.
"""

import pytest

pytestmark = pytest.mark.mpi

CHECK = "tests/mpi/check_hier_ring.py"


@pytest.mark.parametrize("n,per_node", [(2, None), (4, None), (4, "2")])
def test_staging_slots_survive_skewed_ranks(mpirun, n, per_node):
    env = {"HPCSGD_RANKS_PER_NODE": per_node} if per_node else {}
    res = mpirun(CHECK, n, env=env, timeout=240)
    assert res.stdout.count("hierarchical ring checks passed") == n, res.stdout + res.stderr
