"""Multi-host runs on emulated hosts (network namespaces; needs root).

2 emulated hosts x 2 ranks, launched by MPICH's hydra through tests/cluster/netns-ssh.
Checks that hpcsgd sees 2 nodes x 2 ranks with shared memory inside a node and
traffic between nodes on the link, that communicators match the float64
reference across hosts, and that 20 training iterations across 2 hosts give the
same parameters as the same 4 ranks on one host.
"""

import numpy as np
import pytest
from cluster.fixture import emulated_hosts

CHECK = "tests/mpi/check_cluster.py"
pytestmark = [pytest.mark.mpi, pytest.mark.root]


@pytest.fixture(scope="module")
def two_hosts(request):
    return emulated_hosts(request, n_hosts=2)


def _on_hosts(mpirun, cluster, args, timeout=90):
    return mpirun(CHECK, 4, args, env=cluster.env(), timeout=timeout,
                  mpiexec_args=cluster.mpiexec_args(ranks_per_host=2))


def test_two_hosts_are_two_nodes(mpirun, two_hosts):
    before = two_hosts.link_bytes(0)
    res = _on_hosts(mpirun, two_hosts, ["topology", "2", "2"])
    assert res.stdout.count(" ok") == 4, res.stdout
    for r, host in ((0, "hsgd-h0"), (1, "hsgd-h0"), (2, "hsgd-h1"), (3, "hsgd-h1")):
        assert f"rank {r} host {host} node {r // 2}" in res.stdout, res.stdout
    after = two_hosts.link_bytes(0)
    assert after["tx"] > before["tx"] and after["rx"] > before["rx"], (before, after)


SPECS = ["hierarchical:", "hierarchical:float32", "naive:", "flat:", "flat:float16"]


def test_gradient_mean_across_hosts_matches_float64(mpirun, two_hosts, installed):
    specs = [s for s in SPECS if installed(s.split(":")[0])]
    if not specs:
        pytest.skip(f"none of the communicators {SPECS} has landed yet")
    res = _on_hosts(mpirun, two_hosts, ["allreduce", *specs])
    for spec in specs:
        assert res.stdout.count(f"{spec} allreduce ok") == 4, (spec, res.stdout)


def test_training_across_hosts_equals_one_host(mpirun, two_hosts, tmp_path, installed):
    """20 iterations on 2 hosts x 2 ranks == 20 iterations of the same 4 ranks on one host.

    On one host the ranks are split into the same 2 x 2 virtual nodes, so the reduction order
    is the same and the parameters must be bitwise equal.
    """
    if not installed("hierarchical"):
        pytest.skip("the hierarchical communicator has not landed yet")
    across = tmp_path / "across.npz"
    _on_hosts(mpirun, two_hosts, ["train", "hierarchical", str(across), "20"], timeout=120)
    one_host = tmp_path / "one_host.npz"
    mpirun(CHECK, 4, ["train", "hierarchical", str(one_host), "20"], timeout=120,
           env={"HPCSGD_RANKS_PER_NODE": "2"})
    a, b = np.load(across), np.load(one_host)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert np.array_equal(a[k], b[k]), f"{k}: max diff {np.max(np.abs(a[k] - b[k]))}"
