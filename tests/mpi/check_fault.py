"""Rank side of tests/test_faults.py: a training-like loop of collectives, then a fault.

Usage: check_fault.py MODE VICTIM ITER
  MODE   raise  -- rank VICTIM raises RuntimeError in iteration ITER (hpcsgd.runtime.abort must abort the job)
         kill   -- rank VICTIM SIGKILLs itself in iteration ITER, between compute and allreduce
         freeze -- rank VICTIM SIGSTOPs itself in iteration ITER (a hung rank; only the watchdog sees it)
         ok     -- no fault; prints the final sum
         steady -- no fault from inside; rank 0 prints "iteration K" every 10 iterations, for ITER
                   iterations (the test cuts a link from outside)
Run directly (``mpiexec -n N python tests/mpi/check_fault.py ...``), not through
_launch.py, so that hpcsgd's own hooks are what is tested. The watchdog timeout
comes from $HPCSGD_COLLECTIVE_TIMEOUT; with $CHECK_FAULT_PID_DIR set, each rank writes
its pid to rankN.pid there.
"""

import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

import hpcsgd.runtime.abort
from hpcsgd.runtime import watchdog

mode, victim, fault_iter = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
comm = MPI.COMM_WORLD
hpcsgd.runtime.abort.install()
dog = watchdog.install(comm)


def say(line: str) -> None:
    """Print ``line`` in one write, so that hydra never forwards half of it (print is two writes
    under PYTHONUNBUFFERED, which tests/cluster/launch.py sets)."""
    os.write(1, (line + "\n").encode())


say(f"rank {comm.rank} pid {os.getpid()} started")
if os.environ.get("CHECK_FAULT_PID_DIR"):
    # the test finds each rank's pid here, not in the forwarded output: under PYTHONUNBUFFERED a
    # print is two writes (text, then newline), and hydra may splice another rank's line between
    with open(os.path.join(os.environ["CHECK_FAULT_PID_DIR"], f"rank{comm.rank}.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(f.name, f.name[:-4])


def compute_gradients(it: int) -> np.ndarray:
    if mode == "raise" and comm.rank == victim and it == fault_iter:
        say(f"FAULT raise rank {comm.rank} iteration {it} t={time.time():.3f}")
        raise RuntimeError(f"deliberate failure in compute_gradients on rank {comm.rank} iteration {it}")
    return np.full(1000, comm.rank + it, dtype=np.float64)


grad = None
n_iters = fault_iter if mode == "steady" else fault_iter + 20
for it in range(n_iters):
    if mode == "steady" and comm.rank == 0 and it % 10 == 0:
        say(f"iteration {it} t={time.time():.3f}")
    grad = compute_gradients(it)
    if comm.rank == victim and it == fault_iter and mode != "raise":
        say(f"FAULT {mode} rank {comm.rank} iteration {it} t={time.time():.3f}")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)
    out = np.empty_like(grad)
    with watchdog.collective("allreduce", nbytes=grad.nbytes, iteration=it):
        comm.Allreduce(grad, out)
    time.sleep(0.02)

expected = sum(r + it for r in range(comm.size))
assert out[0] == expected, (out[0], expected)
watchdog.uninstall()
say(f"rank {comm.rank} ok {out[0]}")
