"""Completion markers: each rank says "my results are written" before MPI finalizes.

A job whose host link dies after its last collective hangs in ``MPI_Finalize``
(``mpiexec`` waits for the proxy on the unreachable host; docs/faults.md), with
its results already on disk. Nothing inside the job can end it, but the
launcher outside can tell that case from a real hang if every rank leaves a
marker once its final checkpoint and summary are written: ``hpcsgd train``
calls :func:`mark_done` on every rank after training returns (after the last
collective), and ``hpcsgd launch`` ends a job whose ranks have all marked done
but which has not exited within its ``--finalize-grace``.

A marker is ``OUT/launch/done/rank<R>.json`` (rank, size, host, pid, time,
iterations, attempt). ``OUT`` must be visible to the launcher for every rank's
marker to count, as for the watchdog board: put it on the file system the nodes
share. The launcher empties the folder before each attempt, and only markers
written after the attempt started (less :data:`CLOCK_SKEW` for other nodes'
clocks) count for it.
"""

from __future__ import annotations

import json
import os
import socket
import time

ATTEMPT_ENV = "HPCSGD_LAUNCH_ATTEMPT"  # set by hpcsgd launch for each attempt (1, 2, ...)
CLOCK_SKEW = 60.0  # seconds another node's clock may lag the launcher's


def done_dir(out: str | os.PathLike) -> str:
    return os.path.join(os.fspath(out), "launch", "done")


def mark_done(out: str | os.PathLike, iterations: int | None = None) -> str | None:
    """Write this rank's completion marker (atomic rename); returns its path (None if it failed).

    Call it on every rank after the run's final results are written and the last
    collective has returned, before the process exits (and MPI finalizes).
    """
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    folder = done_dir(out)
    record = {"rank": rank, "size": size, "host": socket.gethostname(), "pid": os.getpid(),
              "time": time.time(), "iterations": iterations, "attempt": os.environ.get(ATTEMPT_ENV)}
    path = os.path.join(folder, f"rank{rank}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as e:  # the results are written; a missing marker only loses the finalize bound
        print(f"[hpcsgd] rank {rank}: could not write the completion marker {path}: {e}", flush=True)
        return None
    return path


def clear(out: str | os.PathLike) -> None:
    """Remove the markers of earlier attempts."""
    folder = done_dir(out)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def ranks_done(out: str | os.PathLike, size: int, since: float) -> set[int]:
    """Ranks (of a job of ``size``) whose marker was written at or after ``since`` (epoch s)."""
    folder = done_dir(out)
    done: set[int] = set()
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return done
    for name in names:
        if not (name.startswith("rank") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue  # being written (rename is atomic, but be lenient with foreign files)
        fresh = float(rec.get("time", 0)) >= since - CLOCK_SKEW
        if rec.get("size") == size and fresh and 0 <= rec.get("rank", -1) < size:
            done.add(int(rec["rank"]))
    return done
