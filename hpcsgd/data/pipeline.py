"""Worker processes and the shared-memory batch slots they write into.

Start method (why not ``fork``, and why not plain ``multiprocessing``)
----------------------------------------------------------------------
A training rank has initialised MPI (mpi4py does it at import) and holds live
communicators; forking it copies MPI's state, shared-memory segments and
network endpoints into the child, which is undefined behaviour for MPI. So
workers are fresh interpreters started with ``subprocess`` (spawn semantics):

* ``multiprocessing``'s spawn and forkserver would both re-run the trainer's
  main script in every worker (as ``__mp_main__``) to unpickle objects; an
  MPI training script imports mpi4py at top level, so each worker would call
  ``MPI_Init`` with the launcher's PMI variables inherited and try to join the
  job as a duplicate rank. The forkserver itself is exec'ed clean, but it too
  imports ``__main__`` by default (its preload list).
* Here the worker runs ``python -m hpcsgd.data.worker``: nothing but hpcsgd
  and the pickled dataset/transform are imported, the PMI/PMIx/Hydra variables
  are removed from its environment, and ``MPI4PY_RC_INITIALIZE=0`` is set in
  case a user transform imports mpi4py. ``tests/mpi/check_data_sharding.py``
  verifies that workers under ``mpiexec`` have no MPI state.

The price is ~0.3 s of interpreter + NumPy/Pillow import per worker, paid once
per loader (workers persist across epochs).

Batch slots live in one anonymous shared mapping (``memfd_create``; a deleted
temp file elsewhere) whose file descriptor is inherited by the workers, so
nothing is left behind in /dev/shm even when a process is SIGKILLed. Only
small messages (task id, slot, sample indices, seed) cross the pipes.

A worker that dies closes its pipe; the trainer sees EOF at once and raises
:class:`DataWorkerError` naming the worker, its pid and exit code or signal.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait

from hpcsgd.errors import DataError

_LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "PMI_FD", "HYDRA_", "HYDI_", "MPIEXEC_", "OMPI_", "PRTE_",
                          "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_STEP", "I_MPI_HYDRA")


class DataWorkerError(DataError):
    """A data worker died or stopped answering; names the worker and the cause."""


def worker_env() -> dict:
    """The parent's environment without MPI launcher variables, one thread per worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}
    env["MPI4PY_RC_INITIALIZE"] = "0"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    user_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *user_path])
    return env


def describe_exit(returncode: int | None) -> str:
    """'killed by signal SIGKILL (9) ...' or 'exited with code 3'."""
    if returncode is None:
        return "still running but its pipe closed"
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = (" (the kernel's out-of-memory killer sends SIGKILL; check `dmesg`)"
                if sig == signal.SIGKILL else "")
        return f"killed by signal {name} ({sig}){hint}"
    return f"exited with code {returncode}"


class SharedSlots:
    """``n_slots`` batch slots of ``slot_bytes`` each in one anonymous shared mapping."""

    def __init__(self, n_slots: int, slot_bytes: int):
        self.n_slots, self.slot_bytes = n_slots, slot_bytes
        size = max(1, n_slots * slot_bytes)
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("hpcsgd-batches", 0)
        else:  # pragma: no cover - non-Linux
            shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="hpcsgd-batches-", dir=shm_dir)
            os.unlink(path)
            self.fd = fd
        os.ftruncate(self.fd, size)
        self.buf = mmap.mmap(self.fd, size)

    def close(self) -> None:
        if self.buf is not None:
            try:
                self.buf.close()
            except BufferError:  # a batch view is still alive; the mapping goes with it
                pass
            os.close(self.fd)
            self.buf = None


class WorkerPool:
    """``n`` worker processes, each with a duplex pipe; tasks go to the least-loaded worker."""

    def __init__(self, n: int, config: dict, slots: SharedSlots):
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.load = [0] * n  # outstanding tasks per worker
        self.info: list[dict | None] = [None] * n
        env = worker_env()
        try:
            for w in range(n):
                parent, child = socket.socketpair()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "hpcsgd.data.worker", str(child.fileno()), str(slots.fd), str(w)],
                    pass_fds=(child.fileno(), slots.fd), env=env, stdin=subprocess.DEVNULL)
                child.close()
                conn = Connection(parent.detach())
                self.procs.append(proc)
                self.conns.append(conn)
                conn.send(list(sys.path))
                conn.send(config)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def submit(self, msg: tuple) -> int:
        """Send a task to the least-loaded worker; returns its number."""
        w = min(range(len(self.procs)), key=self.load.__getitem__)
        self._send(w, msg)
        self.load[w] += 1
        return w

    def _send(self, w: int, msg) -> None:
        try:
            self.conns[w].send(msg)
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise self.died(w) from None

    def died(self, w: int) -> DataWorkerError:
        proc = self.procs[w]
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        return DataWorkerError(f"data worker {w} (pid {proc.pid}) died: {describe_exit(proc.returncode)}")

    def receive(self, timeout: float) -> list[tuple[int, tuple]]:
        """Messages ``(worker, msg)`` that arrive within ``timeout`` s; raises if a worker died."""
        ready = wait(self.conns, timeout=timeout)
        out = []
        for conn in ready:
            w = self.conns.index(conn)
            try:
                msg = conn.recv()
            except (EOFError, ConnectionResetError, OSError):
                raise self.died(w) from None
            if msg[0] == "fatal":
                raise DataWorkerError(msg[1])
            if msg[0] in ("ready", "probe"):
                self.info[w] = msg[1]
            if msg[0] in ("done", "error"):
                self.load[w] -= 1
            out.append((w, msg))
        for w, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise self.died(w)
        return out

    def probe(self, timeout: float = 30.0) -> list[dict]:
        """Each worker's process facts (pid, MPI state, launcher variables seen), for checks."""
        for w in range(len(self.procs)):
            self.info[w] = None
            self._send(w, ("probe",))
        deadline = time.monotonic() + timeout
        while any(i is None for i in self.info) and time.monotonic() < deadline:
            self.receive(0.2)
        return list(self.info)

    def close(self, timeout: float = 2.0) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
