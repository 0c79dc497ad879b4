"""Gradient means of every communicator and wire format vs a float64 NumPy reference, on 1-4 ranks.

Each launch runs tests/mpi/check_allreduce.py: naive/flat/hierarchical x float32/float16/bfloat16,
zero_fill, parameters without grads, async handles, the bucket API, mismatch errors naming the
parameter, divergence/overflow errors, and bitwise identical results on every rank (the tolerance
is stated in that file's docstring).
"""

import pytest

pytestmark = pytest.mark.mpi

CHECK = "tests/mpi/check_allreduce.py"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_allreduce_matches_float64_reference(mpirun, n):
    res = mpirun(CHECK, n, timeout=240)
    assert res.stdout.count("allreduce checks passed") == n, res.stdout


def test_allreduce_two_virtual_nodes(mpirun):
    """4 ranks as 2 nodes x 2: shared-memory stage plus the float16 inter-node stage."""
    res = mpirun(CHECK, 4, env={"HPCSGD_RANKS_PER_NODE": "2"}, timeout=240)
    assert res.stdout.count("allreduce checks passed") == 4, res.stdout


def test_allreduce_uneven_nodes_fall_back(mpirun):
    """3 ranks as nodes of 2 + 1: hierarchical falls back to flat and stays correct."""
    res = mpirun(CHECK, 3, ["hierarchical"], env={"HPCSGD_RANKS_PER_NODE": "2"}, timeout=240)
    assert res.stdout.count("allreduce checks passed") == 3, res.stdout
