"""Build emulated hosts for a pytest fixture, torn down by a finalizer (also when a test fails).

Use in a test module::

    @pytest.fixture(scope="module")
    def hosts(request):
        return emulated_hosts(request, n_hosts=2)

It skips the test with the reason when namespaces are unavailable (not root, no
iproute2). Leftovers of a killed run are removed by the next ``up()``.
"""

from __future__ import annotations

import pytest

from .netns import EmulatedCluster, unavailable_reason


def emulated_hosts(request, n_hosts: int = 2, rate: str | None = None) -> EmulatedCluster:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    cluster = EmulatedCluster(n_hosts=n_hosts, rate=rate)
    request.addfinalizer(cluster.down)
    return cluster.up()
