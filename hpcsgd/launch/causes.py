"""Why an attempt of a launched job ended, and whether a restart can help.

The launcher sees the exit status of ``mpiexec`` (MPICH's hydra) or ``srun`` and
the last lines of the job's output. What they mean here:

========================  ==================================================  =========
exit status               cause                                               restart
========================  ==================================================  =========
0                         the job completed                                   -
2                         config or data error (``hpcsgd train`` exits 2;     never
                          a rank aborts with 2 on a ``DataError``)
3                         the collective watchdog aborted a hung collective   yes
1                         a rank raised (``hpcsgd.runtime.abort``: ``MPI_Abort(1)``)  yes
signal N (hydra: N and    a rank was killed (``KILLED BY SIGNAL``, OOM        yes
"(signal N)"; srun:       killer, a node agent)
"task R: Killed")
255                       the launcher lost a host or proxy (ssh/PMI error)   yes
< 0                       ``mpiexec``/``srun`` itself died of a signal        yes
anything else             unknown abnormal end                                yes
========================  ==================================================  =========

A status 2 that the output shows to be a signal (hydra reports a rank killed
by SIGINT as exit code 2 with "(signal 2)") is a signal, not a config error.
Two ends are successes although the status is not 0: every rank wrote its
completion marker and the job then hung past the grace period (the launcher
killed it: ``finalize-hang``) or ended abnormally anyway (``finished``): the
results are complete, and a restart would only redo the final evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONFIG_EXIT = 2  # hpcsgd train's exit status for a config or data error
WATCHDOG_EXIT = 3  # hpcsgd.runtime.watchdog.ABORT_CODE (not imported: the launcher stays MPI-free)
ABORT_EXIT = 1  # hpcsgd.runtime.abort.EXIT_CODE

_SIGNAL_PATTERNS = (
    re.compile(r"EXIT STRING: .*\(signal (\d+)\)"),  # hydra
    re.compile(r"KILLED BY SIGNAL: (\d+)"),  # hydra (older wording)
    re.compile(r"srun: error: .*task[s]? [\d,-]+: (Killed|Terminated|Aborted|Segmentation fault)"),
)
_SRUN_SIGNALS = {"Killed": 9, "Terminated": 15, "Aborted": 6, "Segmentation fault": 11}


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended."""

    kind: str  # ok, config, signal, hang, exception, host, launcher-signal, other, finalize-hang, finished
    cause: str  # one line for the log, naming the evidence
    restart: bool  # whether relaunching with --resume auto can help
    success: bool  # whether the job's results are complete


def _first(lines: list[str], needle: str) -> str | None:
    return next((ln.strip() for ln in lines if needle in ln), None)


def _signal(lines: list[str]) -> int | None:
    for line in lines:
        for pat in _SIGNAL_PATTERNS:
            m = pat.search(line)
            if m:
                g = m.group(1)
                return int(g) if g.isdigit() else _SRUN_SIGNALS.get(g, 9)
    return None


def classify(rc: int, tail: list[str], all_done: bool = False, finalize_killed: bool = False) -> Outcome:
    """Classify an attempt from the launcher's exit status ``rc`` and the output's last lines."""
    if finalize_killed:
        return Outcome("finalize-hang", "every rank wrote its results and marked done, but the job did "
                       "not exit within the finalize grace period (hung in MPI_Finalize?); the launcher "
                       "ended it", restart=False, success=True)
    if rc == 0:
        return Outcome("ok", "the job completed (exit 0)", restart=False, success=True)
    if all_done:
        return Outcome("finished", f"the job ended abnormally (exit {rc}) after every rank marked done; "
                       "its results are complete", restart=False, success=True)
    if rc < 0:
        return Outcome("launcher-signal", f"the launcher process itself was killed by signal {-rc}",
                       restart=True, success=False)
    sig = _signal(tail)
    if sig is not None:
        where = _first(tail, "RUNNING AT") or _first(tail, "srun: error:") or ""
        return Outcome("signal", f"a rank was killed by signal {sig} (exit {rc})"
                       + (f": {where.strip('= ')}" if where else ""), restart=True, success=False)
    if rc == CONFIG_EXIT:
        line = _first(tail, "config error") or _first(tail, "DataError") or _first(tail, "error:")
        return Outcome("config", "config or data error (exit 2)" + (f": {line}" if line else ""),
                       restart=False, success=False)
    if rc == WATCHDOG_EXIT:
        line = _first(tail, "collective timeout")
        return Outcome("hang", "the collective watchdog aborted a hung collective (exit 3)"
                       + (f": {line}" if line else ""), restart=True, success=False)
    if rc == ABORT_EXIT:
        line = _first(tail, "hpcsgd: rank")
        return Outcome("exception", "a rank raised an exception (exit 1)" + (f": {line}" if line else ""),
                       restart=True, success=False)
    if rc == 255:
        last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "")
        return Outcome("host", "the launcher lost a host or proxy (exit 255)" + (f": {last}" if last else ""),
                       restart=True, success=False)
    last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "")
    return Outcome("other", f"the job ended abnormally (exit {rc})" + (f": {last}" if last else ""),
                   restart=True, success=False)
