import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpi_harness import run_mpi  # noqa: E402


@pytest.fixture
def mpirun():
    """``mpirun(script, n, args=(), env=None, timeout=None)`` -> MPIResult; see mpi_harness."""
    return run_mpi
