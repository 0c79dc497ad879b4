"""Collective watchdog: name the collective a rank is in, abort the job when it hangs.

Every blocking collective in :mod:`hpcsgd.comm` runs inside
``with collective("allreduce", nbytes=...):``. That marks which collective this
rank is in and counts collectives (a per-rank sequence number); it costs a
dict update, no communication.

:func:`install` (``hpcsgd train`` calls it) starts a daemon thread per rank
that

* publishes the rank's state on a **board**: one small JSON file per rank
  (``rank<R>.json``: host, pid, collective name and number, since when, and a
  heartbeat time), rewritten every ``heartbeat`` seconds (default 1 s). The
  board is a directory: ``$HPCSGD_WATCHDOG_DIR`` / the ``board_dir`` argument
  (``hpcsgd train`` uses a folder of its output directory, which is shared by
  every node when checkpoints are), else ``/dev/shm`` (node-local).
* aborts the job (``MPI_Abort``) when this rank has been inside one collective
  for longer than ``timeout`` seconds (``$HPCSGD_COLLECTIVE_TIMEOUT`` or the
  ``timeout`` argument; default :data:`DEFAULT_TIMEOUT`; 0 disables it).

Before aborting, the rank reads the board (:mod:`hpcsgd.runtime.board`) and says which ranks did not
arrive, and why as far as the board tells: a rank that is busy outside any
collective (and for how long), a rank stuck in a different collective (a
mismatch: a bug), a rank whose heartbeat stopped (dead or frozen; "process
gone" when it ran on this host and its pid no longer exists), or a rank whose
state the board cannot show (another node, node-local board). When every rank
is waiting in the same collective, the collective itself is stuck in the
network (a cut link, an unreachable peer) and the message says so. None of
this needs MPI progress from the missing rank: the board is plain files.

A rank killed by a signal is usually noticed first by the launcher (MPICH's
hydra kills the whole job within about a second, naming the host and pid of
the dead process); the watchdog covers what launchers do not see: frozen
ranks, hung network links, launchers started with ``-disable-auto-cleanup``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hpcsgd.runtime.board import explain, label, pid_alive, postmortem

TIMEOUT_ENV = "HPCSGD_COLLECTIVE_TIMEOUT"
DIR_ENV = "HPCSGD_WATCHDOG_DIR"
HEARTBEAT_ENV = "HPCSGD_WATCHDOG_HEARTBEAT"
DEFAULT_TIMEOUT = 600.0  # seconds; generous: rank 0 may write a checkpoint while others wait
DEFAULT_HEARTBEAT = 1.0  # seconds between board updates
ABORT_CODE = 3  # MPI_Abort error code of a collective timeout (distinct from hpcsgd.runtime.abort's 1)

_ops: dict[int, tuple[str, float]] = {}  # thread id -> (collective, start time)
_detail: dict[int, tuple[int, dict]] = {}  # thread id -> (sequence number, info)
_seq = 0  # collectives entered by this process
_last: tuple[str, int, float] | None = None  # last finished collective: (name, seq, end time)
_lock = threading.Lock()


def current(thread_id: int | None = None) -> tuple[str, float] | None:
    """(name, start time in s since the epoch) of the collective a thread is in.

    Defaults to the main thread, so a monitor thread can ask what the training
    thread is blocked in.
    """
    tid = threading.main_thread().ident if thread_id is None else thread_id
    return _ops.get(tid)


def sequence() -> int:
    """Number of collectives this process has entered so far."""
    return _seq


@contextmanager
def collective(name: str, **info) -> Iterator[None]:
    """Mark the enclosed block as collective ``name`` on this rank."""
    global _seq, _last
    tid = threading.get_ident()
    prev, prev_detail = _ops.get(tid), _detail.get(tid)
    with _lock:
        _seq += 1
        seq = _seq
    _ops[tid] = (name, time.time())
    _detail[tid] = (seq, info)
    try:
        yield
    finally:
        _last = (name, seq, time.time())
        if prev is None:
            _ops.pop(tid, None)
            _detail.pop(tid, None)
        else:
            _ops[tid] = prev
            _detail[tid] = prev_detail


def _oldest_op() -> tuple[int, str, float, int, dict] | None:
    """(thread id, name, start, seq, info) of the longest-running collective of any thread."""
    best = None
    for tid, (name, start) in list(_ops.items()):
        seq, info = _detail.get(tid, (0, {}))
        if best is None or start < best[2]:
            best = (tid, name, start, seq, info)
    return best


def timeout_from_env(default: float = DEFAULT_TIMEOUT) -> float:
    """``$HPCSGD_COLLECTIVE_TIMEOUT`` in seconds (0 = no timeout); a bad value is a ConfigError."""
    from hpcsgd.runtime.envvars import env_number

    value = env_number(TIMEOUT_ENV, float, 0, "seconds (0 disables the watchdog)")
    return default if value is None else value


STALE_BOARD_AGE = 86400.0  # seconds: boards of killed jobs older than this are removed at install


def _remove_stale_boards(root: Path) -> None:
    """Delete boards that jobs killed long ago left under ``root`` (best effort)."""
    cutoff = time.time() - STALE_BOARD_AGE
    for board in root.glob("hpcsgd-watchdog-*"):
        try:
            if board.stat().st_mtime < cutoff:
                for path in board.iterdir():
                    path.unlink(missing_ok=True)
                board.rmdir()
        except OSError:
            pass


class Watchdog:
    """The per-rank monitor thread; see the module docstring. Create with :func:`install`."""

    def __init__(self, comm, timeout: float, board_dir: str | os.PathLike | None = None,
                 heartbeat: float | None = None):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout = float(timeout)
        self.heartbeat = float(heartbeat or os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        with collective("watchdog_setup"):
            job = comm.bcast(uuid.uuid4().hex[:12] if self.rank == 0 else None, root=0)
        base = board_dir or os.environ.get(DIR_ENV)
        self.shared_board = base is not None
        root = Path(base) if base else Path("/dev/shm")
        self.board = root / f"hpcsgd-watchdog-{job}"
        if self.rank == 0:
            _remove_stale_boards(root)
        self.board.mkdir(parents=True, exist_ok=True)
        self._path = self.board / f"rank{self.rank}.json"
        self._peers: dict[int, int] = {}  # rank -> pid of the other ranks on this host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hpcsgd-watchdog", daemon=True)

    # -- board -----------------------------------------------------------
    def state(self) -> dict:
        op = _oldest_op()
        st = {"rank": self.rank, "size": self.size, "host": self.host, "pid": self.pid,
              "heartbeat": time.time(), "seq": _seq}
        if op is not None:
            _, name, start, seq, info = op
            st.update(op=name, op_seq=seq, since=start,
                      info={k: v for k, v in info.items() if isinstance(v, (int, float, str))})
        else:
            st["op"] = None
            if _last is not None:
                st.update(last_op=_last[0], last_seq=_last[1], since=_last[2])
        return st

    def publish(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state()))
        os.replace(tmp, self._path)

    def read_board(self) -> dict[int, dict]:
        states = {}
        for r in range(self.size):
            try:
                states[r] = json.loads((self.board / f"rank{r}.json").read_text())
            except (OSError, ValueError):
                pass
        return states

    # -- monitor ---------------------------------------------------------
    def start(self) -> Watchdog:
        self.publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.heartbeat + 1)
        try:
            self._path.unlink()
            self.board.rmdir()  # succeeds for the last rank to leave
        except OSError:
            pass

    def _loop(self) -> None:
        poll = min(self.heartbeat, 0.1, max(self.timeout / 4, 0.05) if self.timeout > 0 else 0.1)
        next_beat, published_op = 0.0, None
        while not self._stop.wait(poll):
            now = time.time()
            op = _oldest_op()
            # Publish on the heartbeat, and as soon as a collective has lasted a moment, so the
            # board shows where every rank waits even if the job is killed a second later.
            key = None if op is None or now - op[2] < 0.1 else (op[1], op[3])
            if now >= next_beat or (key is not None and key != published_op):
                try:
                    self.publish()
                except OSError:
                    pass  # a full or vanished board must not kill training
                if now >= next_beat:
                    self._refresh_peers()
                next_beat, published_op = now + self.heartbeat, key
            if key is not None:
                dead = self._dead_local_peers()
                if dead:
                    self._expire(op, dead=dead)
                    return
            if self.timeout > 0 and op is not None and now - op[2] > self.timeout:
                self._expire(op)
                return

    def _refresh_peers(self) -> None:
        """Remember the pids of the ranks on this host (from the board) to watch them die."""
        if len(self._peers) < self.size - 1:
            for r, st in self.read_board().items():
                if r != self.rank and st.get("host") == self.host and st.get("pid"):
                    self._peers[r] = int(st["pid"])

    def _dead_local_peers(self) -> list[int]:
        return [r for r, pid in self._peers.items() if not pid_alive(pid)]

    def _expire(self, op, dead: list[int] | None = None) -> None:
        from hpcsgd.runtime.abort import abort_job

        _, name, start, seq, info = op
        try:
            self.publish()
        except OSError:
            pass
        board = self.read_board()
        report = explain(board, self.size, name=name, here=self.host, stale_after=self.stale_after)
        if dead:
            head = (f"collective timeout: rank(s) {', '.join(map(str, dead))} on this host died while "
                    f"rank {self.rank} waited {time.time() - start:.1f} s in collective "
                    f"{label(name, seq, info)}")
        else:
            head = (f"collective timeout: collective {label(name, seq, info)} did not complete within "
                    f"{self.timeout:g} s (waited {time.time() - start:.1f} s) on rank {self.rank}")
        if report.unknown and not self.shared_board:
            report.lines.append(f"  (the board {self.board.parent} is node-local; set {DIR_ENV} to a "
                                f"directory every node shares to see the other nodes)")
        waiting = sorted(r for r in report.waiting if r != self.rank) + [self.rank]
        if min(waiting) != self.rank:
            # The lowest waiting rank prints the full report; abort later if it did not.
            time.sleep(2 * self.heartbeat + 1)
            abort_job(f"{head} (see the report of rank {min(waiting)})", code=ABORT_CODE)
        lines = [head, *report.lines, f"  board: {self.board}; timeout: ${TIMEOUT_ENV} (seconds)"]
        abort_job("\n".join(lines), code=ABORT_CODE)

    @property
    def stale_after(self) -> float:
        """Seconds without a heartbeat after which a rank counts as dead or frozen."""
        return max(3 * self.heartbeat, 2.0)


_active: Watchdog | None = None


def install(comm=None, timeout: float | None = None, board_dir: str | os.PathLike | None = None,
            heartbeat: float | None = None) -> Watchdog | None:
    """Start the watchdog on this rank (collective over ``comm``, default ``MPI.COMM_WORLD``).

    Args:
        timeout: seconds a rank may spend in one collective before the job is
            aborted; default ``$HPCSGD_COLLECTIVE_TIMEOUT`` or 600; 0 disables
            the watchdog (returns None).
        board_dir: directory for the board (default ``$HPCSGD_WATCHDOG_DIR``,
            else node-local ``/dev/shm``).
        heartbeat: seconds between board updates (default 1).

    Idempotent: a second call returns the running watchdog.
    """
    global _active
    if _active is not None:
        return _active
    from mpi4py import MPI

    timeout = timeout_from_env() if timeout is None else float(timeout)
    if timeout <= 0:
        return None
    _active = Watchdog(comm or MPI.COMM_WORLD, timeout, board_dir, heartbeat).start()
    return _active


def uninstall() -> None:
    """Stop the watchdog and remove this rank's board entry."""
    global _active
    if _active is not None:
        _active.stop()
        _active = None


def active() -> Watchdog | None:
    return _active


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcsgd.runtime.watchdog DIR``: explain the jobs that died leaving a board in DIR."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("dir", nargs="?", default=os.environ.get(DIR_ENV, "/dev/shm"))
    p.add_argument("--remove", action="store_true", help="delete the boards after reporting")
    args = p.parse_args(argv)
    reports = postmortem(args.dir, remove=args.remove)
    print("\n\n".join(reports) if reports else f"no abandoned watchdog boards under {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
