"""The data worker process: ``python -m hpcsgd.data.worker CONN_FD SHM_FD WORKER_ID``.

Started by :class:`hpcsgd.data.pipeline.WorkerPool` as a fresh interpreter
(spawn semantics, no fork, no re-import of the trainer's main script), with the
MPI launcher's environment removed, so it never touches MPI. It receives its
dataset and transform once, then loops over batch tasks, writing each batch
into a shared-memory slot and answering with a small message (no image data
crosses the pipe). It exits when the pipe closes, i.e. when the trainer exits.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection


def _info() -> dict:
    mpi = sys.modules.get("mpi4py.MPI")
    return {"pid": os.getpid(), "mpi4py_imported": mpi is not None,
            "mpi_initialized": bool(mpi.Is_initialized()) if mpi is not None else False,
            "mpi_env": sorted(k for k in os.environ
                              if k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPI_LOCAL")))}


def serve(conn: Connection, shm_fd: int, worker_id: int) -> None:
    sys.path[:0] = [p for p in conn.recv() if p not in sys.path]
    try:
        from hpcsgd.data.batch import batch_rng, fill_batch
        from hpcsgd.errors import DataError

        cfg = conn.recv()
        layout, n_slots = cfg["layout"], cfg["n_slots"]
        buf = mmap.mmap(shm_fd, layout.slot_bytes * n_slots)
    except BaseException as e:  # noqa: BLE001 - report any setup failure to the trainer
        conn.send(("fatal", f"data worker {worker_id} could not start: {type(e).__name__}: {e}\n"
                            f"{traceback.format_exc()}"))
        return
    conn.send(("ready", _info()))
    dataset, transform, normalize, on_bad = cfg["dataset"], cfg["transform"], cfg["normalize"], cfg["on_bad"]
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        if msg[0] == "probe":
            conn.send(("probe", _info()))
            continue
        _, task_id, slot, indices, seed_key = msg
        x, t = layout.views(buf, slot)
        try:
            skipped = fill_batch(dataset, transform, normalize, indices, batch_rng(*seed_key), x, t, on_bad)
            conn.send(("done", task_id, skipped))
        except DataError as e:
            conn.send(("error", task_id, str(e)))
        except MemoryError:
            conn.send(("error", task_id, f"data worker {worker_id}: out of memory while filling a batch"))
        del x, t


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; we exit on EOF
    conn_fd, shm_fd, worker_id = (int(a) for a in sys.argv[1:4])
    conn = Connection(conn_fd)
    try:
        serve(conn, shm_fd, worker_id)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass


if __name__ == "__main__":
    main()
