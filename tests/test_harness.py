"""The MPI test harness itself: success, failure propagation, hang detection."""

import time

import pytest
from mpi_harness import MPIFailure, MPIHang

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ok(mpirun, n):
    res = mpirun("tests/mpi/check_harness.py", n, ["ok"], timeout=60)
    assert res.stdout.count(" ok ") == n


def test_exception_on_one_rank_aborts_all(mpirun):
    t0 = time.perf_counter()
    with pytest.raises(MPIFailure) as ei:
        mpirun("tests/mpi/check_harness.py", 2, ["raise"], timeout=60)
    assert "deliberate failure on rank 1" in str(ei.value)
    assert time.perf_counter() - t0 < 30


def test_hang_is_reported_with_stuck_ranks(mpirun):
    with pytest.raises(MPIHang) as ei:
        mpirun("tests/mpi/check_harness.py", 2, ["hang"], timeout=12)
    msg = str(ei.value)
    assert "rank1" in msg and "in collective barrier" in msg, msg
    assert "check_harness.py" in msg
