"""GPU selection uses the physical node-local rank and refuses two ranks on one GPU (MPI, no GPU)."""

import pytest

from tests.mpi_harness import run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gpu_choice_ignores_virtual_nodes_and_refuses_sharing(n):
    r = run_mpi("tests/mpi/check_gpu_topology.py", n, env={"HPCSGD_RANKS_PER_NODE": 1}, timeout=90)
    assert r.stdout.count(" ok") == n, r.stdout
