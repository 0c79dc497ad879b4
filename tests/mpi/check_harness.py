"""Ranks for tests/test_harness.py: modes 'ok', 'raise', 'hang'."""

import sys

from mpi4py import MPI

mode = sys.argv[1]
comm = MPI.COMM_WORLD
if mode == "ok":
    total = comm.allreduce(comm.rank + 1)
    assert total == comm.size * (comm.size + 1) // 2, total
    print(f"rank {comm.rank} ok {total}")
elif mode == "raise":
    if comm.rank == comm.size - 1:
        raise RuntimeError(f"deliberate failure on rank {comm.rank}")
    comm.Barrier()
elif mode == "hang":
    from hpcsgd.runtime.watchdog import collective

    if comm.rank != 0:
        with collective("barrier"):
            comm.Barrier()  # rank 0 never arrives
    else:
        import time

        time.sleep(1000)
