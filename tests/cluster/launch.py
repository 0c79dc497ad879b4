"""Run an MPI job that is expected to fail, with a hard timeout, and time its end.

Unlike tests/mpi_harness.py (which fails the test on a non-zero exit), fault
tests *expect* the job to die; they need the exit code, the output and when it
ended. ``run_job`` never raises on a non-zero exit; on a timeout it kills the
whole process group and returns ``timed_out=True``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mpi_harness import mpiexec_path  # noqa: E402


@dataclass
class JobResult:
    returncode: int | None
    output: str  # stdout and stderr interleaved
    started: float  # epoch seconds
    ended: float
    timed_out: bool

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def fault_time(self) -> float | None:
        """Epoch time printed by the rank that injected the fault (``FAULT ... t=<epoch>``)."""
        # not anchored at a line start: under PYTHONUNBUFFERED a rank's print is two writes (text,
        # then newline), so another rank's line can arrive spliced in front of this one
        m = re.search(r"FAULT .* t=([0-9.]+)", self.output)
        return float(m.group(1)) if m else None

    def detect_seconds(self) -> float | None:
        """Seconds from the injected fault to the end of the job."""
        t = self.fault_time()
        return None if t is None else self.ended - t


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def run_job(argv: list[str], n: int, *, timeout: float, env: dict | None = None,
            mpiexec_args: list[str] | tuple = (), on_line=None) -> JobResult:
    """``mpiexec [mpiexec_args] -n N ARGV...``; ``on_line(line, proc)`` sees each output line live."""
    cmd = [mpiexec_path(), *mpiexec_args, "-n", str(n), *argv]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job_env(env), cwd=str(ROOT), start_new_session=True)
    lines: list[str] = []

    def reader() -> None:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line, proc)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    ended = time.time()
    t.join(timeout=5)
    return JobResult(proc.returncode, "".join(lines), started, ended, timed_out)
