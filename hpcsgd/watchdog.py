"""Collective watchdog: name the collective a rank is in, abort when it hangs.

Every blocking collective in :mod:`hpcsgd.comm` runs inside
``with collective("allreduce", nbytes=...):``. This records which collective
this rank is in (for hang reports). The full watchdog (timeout thread,
MPI_Abort with the names of the ranks that did not arrive) is built on this
same call site; see issue 6.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

_ops: dict[int, tuple[str, float]] = {}  # thread id -> (collective, start time)


def current(thread_id: int | None = None) -> tuple[str, float] | None:
    """(name, start time in s since the epoch) of the collective a thread is in.

    Defaults to the main thread, so a monitor thread can ask what the training
    thread is blocked in.
    """
    tid = threading.main_thread().ident if thread_id is None else thread_id
    return _ops.get(tid)


@contextmanager
def collective(name: str, **info) -> Iterator[None]:
    """Mark the enclosed block as collective ``name`` on this rank."""
    tid = threading.get_ident()
    prev = _ops.get(tid)
    _ops[tid] = (name, time.time())
    try:
        yield
    finally:
        if prev is None:
            _ops.pop(tid, None)
        else:
            _ops[tid] = prev
