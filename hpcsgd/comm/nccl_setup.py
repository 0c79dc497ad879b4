"""NCCL set-up for the GPU path: is NCCL usable, communicators on the rank's GPU, a small device allreduce.

Why a module of its own: every GPU algorithm (:mod:`hpcsgd.comm.nccl`) and sync
BN (:mod:`hpcsgd.models.batchnorm`) need the same three guarantees before the
first NCCL call:

* every rank agrees whether NCCL works (:func:`require_nccl`): CuPy sets
  ``cupy.cuda.nccl.available = False`` when ``libnccl.so.2`` cannot be loaded,
  and the first call would otherwise fail with an ``AttributeError`` on one rank
  while the others wait;
* a communicator is created on the rank's own GPU (:func:`nccl_comm_over`):
  ``ncclCommInitRank`` binds to the device current *on the calling thread*;
* set-up and small reductions are inside the watchdog's ``collective``.

``_cupy_nccl`` is the one place CuPy is imported, so tests can put a stand-in there.
"""

from __future__ import annotations

import weakref

import numpy as np

from hpcsgd.runtime.watchdog import collective

INSTALL_HINT = ("pip install 'hpcsgd[gpu]' (CuPy 13 for CUDA 12 with the NCCL and cuDNN wheels; "
                "docs/gpu.md)")


def _cupy_nccl():
    """``(cupy, cupy.cuda.nccl)``; ImportError when CuPy is missing (a seam for stand-in tests)."""
    import cupy
    from cupy.cuda import nccl

    return cupy, nccl


def nccl_problem() -> str | None:
    """Why NCCL cannot be used in this process (None when it can).

    CuPy imports its NCCL binding lazily and sets ``cupy.cuda.nccl.available``
    to False when ``libnccl.so.2`` cannot be loaded; without this check the
    first NCCL call fails with an ``AttributeError`` on a missing name.
    """
    try:
        _, nccl = _cupy_nccl()
    except ImportError as e:
        return f"CuPy is not importable ({e}): {INSTALL_HINT}"
    if not getattr(nccl, "available", False) or not hasattr(nccl, "NcclCommunicator"):
        return ("CuPy cannot load libnccl (cupy.cuda.nccl.available is False): "
                "pip install 'nvidia-nccl-cu12>=2.16.5' (CuPy 13 loads NCCL from that wheel) or put "
                f"the directory of libnccl.so.2 on LD_LIBRARY_PATH; {INSTALL_HINT}")
    return None


def require_nccl(mpi_comm):
    """``cupy.cuda.nccl`` when every rank of ``mpi_comm`` can use it, else the same RuntimeError on all.

    Collective: one small allgather, so a rank without NCCL cannot leave the
    others waiting in the NCCL set-up.
    """
    problem = nccl_problem()
    with collective("nccl_check"):
        problems = mpi_comm.allgather(problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        r, p = bad[0]
        raise RuntimeError(f"NCCL is unavailable on {len(bad)} rank(s), e.g. rank {r}: {p}")
    return _cupy_nccl()[1]


def current_device() -> int:
    """The CUDA device current on this thread (the one the training loop selected)."""
    cupy, _ = _cupy_nccl()
    return int(cupy.cuda.Device().id)


def nccl_comm_over(mpi_comm, device: int):
    """A ``cupy.cuda.nccl.NcclCommunicator`` over the ranks of ``mpi_comm``, on GPU ``device`` (collective).

    ``ncclCommInitRank`` binds the communicator to the device current when it
    runs, hence the explicit ``Device(device)`` context.
    """
    nccl = require_nccl(mpi_comm)
    cupy, _ = _cupy_nccl()
    with collective("nccl_init", ranks=mpi_comm.Get_size()):
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        with cupy.cuda.Device(device):
            return nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank())


def _nccl_dtype(wire: str):
    _, nccl = _cupy_nccl()
    if wire == "bfloat16":
        if not hasattr(nccl, "NCCL_BFLOAT16"):
            raise ValueError("this CuPy/NCCL has no bfloat16; use float16 or float32")
        return nccl.NCCL_BFLOAT16
    return {"float32": nccl.NCCL_FLOAT32, "float16": nccl.NCCL_FLOAT16}[wire]


_NCCL_SUM_DTYPES = {"float64": "NCCL_FLOAT64", "float32": "NCCL_FLOAT32", "float16": "NCCL_FLOAT16"}


def _world_nccl(comm, device: int):
    """NCCL communicator over all ranks of an hpcsgd communicator, cached on it (None without NCCL).

    Created at the first call (collective, like every sync-BN call); all ranks
    agree whether NCCL works, so either all use it or all fall back to MPI.
    Destroyed when the communicator object goes away.
    """
    cached = getattr(comm, "_nccl_world", None)
    if cached is not None and cached[0] == device:
        return cached[1]
    mpi_comm = comm._mpi_comm
    with collective("nccl_check"):
        usable = all(p is None for p in mpi_comm.allgather(nccl_problem()))
    nc = nccl_comm_over(mpi_comm, device) if usable else None
    comm._nccl_world = (device, nc)
    if nc is not None:
        weakref.finalize(comm, nc.destroy)
    return nc


def device_allreduce(comm, buf, name: str):
    """Sum the CuPy array ``buf`` over all ranks of ``comm`` in place with NCCL; None when not possible.

    Why: ``comm.allreduce`` copies a CuPy array to the host, through MPI and back
    (two copies and a host sync per call), which sync BN would pay per layer and
    pass. NCCL reduces it on the device, enqueued on the current stream. Returns
    None (the caller then uses ``comm.allreduce``) for communicators that are not
    hpcsgd MPI communicators, dtypes NCCL cannot sum, or when NCCL is missing.
    """
    dtype = np.dtype(buf.dtype).name
    if getattr(comm, "_mpi_comm", None) is None or dtype not in _NCCL_SUM_DTYPES:
        return None
    cupy, nccl = _cupy_nccl()
    device = int(buf.device.id)
    nc = _world_nccl(comm, device)
    if nc is None:
        return None
    buf = cupy.ascontiguousarray(buf)
    with cupy.cuda.Device(device), collective(name, nbytes=int(buf.nbytes)):
        nc.allReduce(buf.data.ptr, buf.data.ptr, buf.size, getattr(nccl, _NCCL_SUM_DTYPES[dtype]),
                     nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
    return buf
