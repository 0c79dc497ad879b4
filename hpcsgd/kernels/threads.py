"""One thread count per rank, applied to BLAS and to numba's kernels alike.

With ``T`` threads per rank, the GEMMs of the convolutions (OpenBLAS, MKL or
BLIS via numpy) and hpcsgd's numba kernels (batch norm, ReLU, im2col) must all
run on ``T`` threads: otherwise one of them oversubscribes the cores or leaves
them idle. :func:`set_threads` sets both; :func:`default_threads` picks ``T``
from the environment.
"""

from __future__ import annotations

import os

from hpcsgd.runtime.envvars import env_number

_blas_limiter = None
_current: int | None = None


def default_threads(environ=None) -> int:
    """Threads per rank: ``HPCSGD_THREADS``, else ``OMP_NUM_THREADS``, else cores / local ranks.

    The number of local ranks is read from MPI launchers' environment
    (MPICH/Hydra ``MPI_LOCALNRANKS``, Open MPI ``OMPI_COMM_WORLD_LOCAL_SIZE``); without
    one, a single rank is assumed.
    """
    env = os.environ if environ is None else environ
    for name in ("HPCSGD_THREADS", "OMP_NUM_THREADS"):
        n = env_number(name, int, 1, "threads", environ=env)
        if n is not None:
            return n
    local = 1
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            local = int(value)
            break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


def set_threads(n: int) -> int:
    """Run BLAS and numba kernels on ``n`` threads each (per process); returns the count applied.

    numba cannot go above the size of the pool it started with
    (``NUMBA_NUM_THREADS``, default: all cores); ``n`` is capped there. Sets
    ``OMP_WAIT_POLICY=PASSIVE`` unless set, before numba's OpenMP pool starts:
    two pools (BLAS, numba) alternate on the same cores, and a spinning idle pool
    steals them from the busy one.
    """
    global _blas_limiter, _current
    if int(n) < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    import numba
    from threadpoolctl import threadpool_limits

    # numba's OpenMP pool starts on first use; its idle threads should sleep, not spin, so
    # they leave the cores to the BLAS threads between kernels (a user setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n_numba = min(int(n), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n_numba)
    # Not used as a context manager: the limit stays until changed again.
    _blas_limiter = threadpool_limits(limits=int(n), user_api="blas")
    _current = int(n)
    return n_numba


def current_threads() -> dict:
    """The thread counts in force: ``{'blas': [..per library..], 'numba': n}``."""
    import numba
    from threadpoolctl import threadpool_info

    blas = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return {"blas": blas, "numba": numba.get_num_threads(), "requested": _current}
