"""Per-launch probe of where two ranks' CPUs share cache: read speed of a peer's fresh data.

Why: on a VM the guest sees 2 CPUs and one L3, but the host decides which cores
(and which L3: a Zen CCD has its own) the vCPUs run on, per launch or over time.
The shared-memory node stage hands each bucket from one rank's cache to the
other's; with a shared L3 that hand-off never reaches DRAM, without one it
does. This probe measures, in the same launch as the allreduce timings:

* ``own_GBps``: rank 1 copies ``nbytes`` it has just written itself (its own L2/L3);
* ``peer_GBps``: rank 1 copies ``nbytes`` rank 0 has just written (a shared L3 if
  the two cores share one, else the other cache or DRAM);
* ``dram_GBps``: rank 1 copies a buffer ten times larger than the L3 (DRAM).

GB/s are bytes read / second (median of ``repeats``). ``peer_GBps`` close to
``own_GBps`` says the cores share a cache; close to ``dram_GBps`` says they do not.
Collective over ``comm`` (node-local); ranks other than 0 and 1 only take part in the fences.
"""

from __future__ import annotations

import time

import numpy as np


def probe(comm, nbytes: int = 4 << 20, repeats: int = 15) -> dict | None:
    """The three read speeds above (rank 1's; None on other ranks or with fewer than 2 ranks)."""
    from hpcsgd.comm.shm import SharedSegments

    if comm.Get_size() < 2:
        return None
    n = nbytes // 4
    shm = SharedSegments(comm, n, np.float32)
    rank = comm.Get_rank()
    src = np.arange(n, dtype=np.float32)
    dst = np.empty(n, np.float32)
    big = np.ones(max(n, (256 << 20) // 4), np.float32)
    big_dst = np.empty_like(big)
    own, peer, dram = [], [], []
    try:
        for i in range(repeats):
            for writer, out in ((1, own), (0, peer)):
                if rank == writer:
                    np.add(src, i, out=shm.segments[writer])  # fresh lines in the writer's cache
                shm.fence("probe")
                if rank == 1:
                    t0 = time.perf_counter()
                    np.copyto(dst, shm.segments[writer])
                    out.append(nbytes / (time.perf_counter() - t0) / 1e9)
                shm.fence("probe")
            if rank == 1:
                t0 = time.perf_counter()
                np.copyto(big_dst, big)
                dram.append(big.nbytes / (time.perf_counter() - t0) / 1e9)
    finally:
        shm.free()
    if rank != 1:
        return None
    return {"nbytes": nbytes, "own_GBps": float(np.median(own)), "peer_GBps": float(np.median(peer)),
            "dram_GBps": float(np.median(dram))}
