"""Shared fixtures: every test starts from seeded RNGs; optional record of outcomes and value digests.

Seeding: before each test, Python's ``random`` and NumPy's global RNG (which
Chainer's initializers draw from) are seeded from a CRC32 of the test's node
id, so a test sees the same random numbers whether it runs alone, in a
subset or in the whole suite, and two tests never share a stream by accident.
CuPy's RNG is seeded too when CuPy is already imported.

Repeat check (``scripts/test.sh``): with ``HPCSGD_TEST_RECORD=FILE`` set, each
test appends ``nodeid<TAB>outcome<TAB>digest`` to FILE, where the digest is a
sha256 over whatever the test passed to the ``digest`` fixture (outputs,
gradients). Runs in separate processes must produce identical files.
"""

import hashlib
import os
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpi_harness import run_mpi  # noqa: E402

RECORD = os.environ.get("HPCSGD_TEST_RECORD")


def seed_for(nodeid: str) -> int:
    """A 32-bit seed derived from the test's node id (stable across runs and machines)."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_rngs(request):
    seed = seed_for(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    if "cupy" in sys.modules:
        sys.modules["cupy"].random.seed(seed)
    yield


class Digest:
    """sha256 over the bytes, dtype and shape of every array given to :meth:`add`, in order."""

    def __init__(self):
        self._h = hashlib.sha256()
        self.used = False

    def add(self, *arrays) -> None:
        for a in arrays:
            a = np.ascontiguousarray(a.get() if hasattr(a, "get") else a)
            self._h.update(f"{a.dtype.str}{a.shape}".encode())
            self._h.update(a.tobytes())
        self.used = True

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16] if self.used else "-"


@pytest.fixture
def digest(request):
    """``digest.add(*arrays)``: values whose bits must not change between repeated runs."""
    d = Digest()
    request.node._hpcsgd_digest = d
    return d


if RECORD:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            d = getattr(item, "_hpcsgd_digest", None)
            with open(RECORD, "a") as f:
                f.write(f"{item.nodeid}\t{report.outcome}\t{d.hexdigest() if d else '-'}\n")


@pytest.fixture
def mpirun():
    """``mpirun(script, n, args=(), env=None, timeout=None)`` -> MPIResult; see mpi_harness."""
    return run_mpi


@pytest.fixture
def installed():
    """``installed(name)`` -> bool: communicator ``name`` is registered and its module imports, so a
    test of a communicator that has not landed yet can skip rather than fail."""
    from hpcsgd.comm import communicator_class

    def installed(name: str) -> bool:
        try:
            communicator_class(name)
        except ValueError:
            return False
        return True

    return installed
