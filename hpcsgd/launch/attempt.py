"""Run one attempt of a launched job: forward its output, watch its completion markers.

The job (``mpiexec``/``srun`` and everything it starts on this node) runs in its
own session, so the launcher can end all of it with one ``killpg``. Its stdout
and stderr are forwarded line by line to the launcher's, and the last lines are
kept for :func:`hpcsgd.launch.causes.classify`.

Once every rank has written its completion marker (:mod:`hpcsgd.launch.markers`)
the attempt has ``grace`` seconds to exit; past that the launcher ends it
(SIGTERM, then SIGKILL after :data:`KILL_AFTER` s) and reports a finalize hang.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from hpcsgd.launch import markers

TAIL_LINES = 200  # output lines kept for classification
KILL_AFTER = 5.0  # seconds between SIGTERM and SIGKILL when ending a job
POLL = 0.2  # seconds between checks of the job and its markers


@dataclass
class AttemptResult:
    returncode: int
    tail: list[str]
    started: float  # epoch seconds
    ended: float
    all_done_at: float | None = None  # when the last completion marker appeared
    finalize_killed: bool = False
    interrupted: int | None = None  # signal the launcher received and forwarded
    notes: list[str] = field(default_factory=list)


def _forward(stream, sink, tail: collections.deque, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            tail.append(line.rstrip("\n"))
        try:
            sink.write(line)
            sink.flush()
        except (OSError, ValueError):
            pass


def kill_group(pgid: int, proc: subprocess.Popen | None = None, grace: float = KILL_AFTER) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` s if its leader is still there."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if proc is not None:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Attempt:
    """One run of the job: :meth:`run` blocks until it ends; :meth:`interrupt` is signal-handler safe."""

    def __init__(self, cmd: list[str], env: dict, out: str, size: int, grace: float, log=print):
        self.cmd, self.env, self.out, self.size, self.grace, self.log = cmd, env, out, size, grace, log
        self.proc: subprocess.Popen | None = None
        self._interrupt: int | None = None

    def interrupt(self, signum: int) -> None:
        """Forward ``signum`` to the job (the launcher was asked to stop); no restart follows."""
        self._interrupt = signum
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def run(self) -> AttemptResult:
        markers.clear(self.out)
        started = time.time()
        tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        lock = threading.Lock()
        self.proc = proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, errors="replace",
                                            start_new_session=True)
        readers = [threading.Thread(target=_forward, args=(s, sink, tail, lock), daemon=True)
                   for s, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in readers:
            t.start()
        res = AttemptResult(returncode=0, tail=[], started=started, ended=started)
        while proc.poll() is None:
            if self._interrupt is not None and res.interrupted is None:
                res.interrupted = self._interrupt
                threading.Thread(target=kill_group, args=(proc.pid, proc), daemon=True).start()
            if res.all_done_at is None and res.interrupted is None:
                if len(markers.ranks_done(self.out, self.size, started)) == self.size:
                    res.all_done_at = time.time()
                    self.log(f"every rank ({self.size}) marked done; the job has {self.grace:g} s to exit")
            elif res.all_done_at is not None and time.time() - res.all_done_at > self.grace:
                self.log(f"the job has not exited {self.grace:g} s after every rank marked done: "
                         f"ending it (results are complete)")
                res.finalize_killed = True
                kill_group(proc.pid, proc)
                break
            time.sleep(POLL)
        proc.wait()
        if res.all_done_at is None and not res.finalize_killed:
            if len(markers.ranks_done(self.out, self.size, started)) == self.size:
                res.all_done_at = time.time()  # marked done just before exiting
        try:  # leftovers on this node (ranks of a proxy that died first): the next attempt starts clean
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for t in readers:
            t.join(timeout=2.0)
        res.returncode = proc.returncode
        res.ended = time.time()
        with lock:
            res.tail = list(tail)
        if self._interrupt is not None:
            res.interrupted = self._interrupt
        self.proc = None
        return res
