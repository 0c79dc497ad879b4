"""Abort the whole MPI job when one rank dies of an uncaught exception.

Without this, a rank that raises exits while the others wait forever in their
next collective. :func:`install` sets ``sys.excepthook`` and
``threading.excepthook`` so that an uncaught exception in any thread

1. prints ``hpcsgd: rank R/N (host H, pid P) ...`` and the full traceback to
   stderr (flushed, so the launcher forwards it before the job is torn down),
2. calls ``MPI.COMM_WORLD.Abort(1)``, which makes the launcher kill every rank.

``hpcsgd train`` installs it; any script can::

    import hpcsgd.runtime.abort
    hpcsgd.runtime.abort.install()

``python -m mpi4py script.py`` does the same for the main thread; this hook
adds the rank banner, threads, and an exit code that says why.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback

EXIT_CODE = 1  # the MPI_Abort error code (what mpiexec reports for the job)
# Seconds between writing the report and MPI_Abort: hydra tears the job down as soon as
# it sees the abort and drops stderr still in its pipes, so give the proxy time to forward it.
FLUSH_DELAY = 0.5

_installed = False
_aborting = threading.Lock()


def _rank_banner() -> str:
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            w = MPI.COMM_WORLD
            return f"rank {w.Get_rank()}/{w.Get_size()}"
    except Exception:
        pass
    return "rank ?"


def abort_job(message: str, exc_info=None, code: int = EXIT_CODE) -> None:
    """Print ``message`` (and a traceback) to stderr, then abort every rank of the job.

    Never returns. Safe to call from any thread; the second caller just waits
    for the first one's abort.
    """
    if not _aborting.acquire(blocking=False):
        threading.Event().wait()  # another thread is already aborting
    text = f"hpcsgd: {_rank_banner()} (host {socket.gethostname()}, pid {os.getpid()}): {message}\n"
    if exc_info is not None:
        text += "".join(traceback.format_exception(*exc_info))
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        pass
    time.sleep(FLUSH_DELAY)
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)  # not under MPI (or Abort returned): still end this process


def _excepthook(exc_type, exc, tb) -> None:
    if issubclass(exc_type, SystemExit):  # sys.exit(...) is a normal end
        sys.__excepthook__(exc_type, exc, tb)
        return
    abort_job(f"uncaught {exc_type.__name__}; aborting the MPI job", (exc_type, exc, tb))


def _thread_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    abort_job(f"uncaught {args.exc_type.__name__} in thread {name!r}; aborting the MPI job",
              (args.exc_type, args.exc_value, args.exc_traceback))


def install() -> None:
    """Make an uncaught exception in any thread of this rank abort the MPI job (idempotent)."""
    global _installed
    if _installed:
        return
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    _installed = True


def uninstall() -> None:
    """Restore Python's default hooks."""
    global _installed
    sys.excepthook = sys.__excepthook__
    threading.excepthook = threading.__excepthook__
    _installed = False
