"""Faults 1 and 2 of the fault table (a rank raises, a rank dies, a rank hangs) and the watchdog's logic.

Each MPI fault test launches ``tests/mpi/check_fault.py`` on 4 ranks of this
machine, injects the fault, asserts the job ends non-zero within its time bound
with the right message, and records the result for scripts/fault_table.py.
"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from cluster.faultlog import record
from cluster.launch import run_job

from hpcsgd.errors import ConfigError
from hpcsgd.runtime import board as board_reader
from hpcsgd.runtime import watchdog

CHECK = ["python", "tests/mpi/check_fault.py"]
pytestmark = pytest.mark.mpi


def _pids(pid_dir) -> dict[int, int]:
    """Each rank's pid, from the rankN.pid files check_fault.py writes into ``pid_dir``.

    Not parsed from the job's output: a print under PYTHONUNBUFFERED is two writes, and hydra
    can forward another rank's line between them (seen in CI: rank 1's pid missing).
    """
    pids = {int(p.name[4:-4]): int(p.read_text()) for p in Path(pid_dir).glob("rank*.pid")}
    assert sorted(pids) == [0, 1, 2, 3], f"pid files found for ranks {sorted(pids)}, want 0-3"
    return pids


def _gone(pid: int, wait: float = 5.0) -> bool:
    """Whether process ``pid`` has exited (allowing ``wait`` s for the launcher's kill to land)."""
    deadline = time.time() + wait
    while not _gone_now(pid) and time.time() < deadline:
        time.sleep(0.1)
    return _gone_now(pid)


def _gone_now(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_rank_exception_aborts_the_job(request, tmp_path):
    """Fault 1: rank 3 raises; the job aborts within 10 s with rank 3's traceback, exit code != 0."""
    res = run_job([sys.executable, *CHECK[1:], "raise", "3", "5"], 4, timeout=40,
                  env={"HPCSGD_COLLECTIVE_TIMEOUT": "30", "HPCSGD_WATCHDOG_DIR": tmp_path,
                       "CHECK_FAULT_PID_DIR": tmp_path})
    assert not res.timed_out, res.output
    assert res.returncode != 0, res.output
    out = res.output
    assert "hpcsgd: rank 3/4" in out and "uncaught RuntimeError" in out, out
    assert "Traceback (most recent call last)" in out and "in compute_gradients" in out, out
    assert "deliberate failure in compute_gradients on rank 3 iteration 5" in out, out
    assert " ok " not in out, out
    t = res.detect_seconds()
    assert t is not None and t < 10, f"job took {t} s to abort after the exception"
    for pid in _pids(tmp_path).values():
        assert _gone(pid), f"rank process {pid} survived the abort"
    record("f1_rank_raises", order=1, fault="A rank raises an exception",
           injected="rank 3 of 4 raises RuntimeError in iteration 5 (tests/mpi/check_fault.py raise)",
           outcome=f"hpcsgd.runtime.abort prints rank 3's traceback, MPI_Abort ends all 4 ranks, exit code "
                   f"{res.returncode}",
           detect_s=t, bound_s=10, data_lost="the running iteration (nothing written)",
           test=request.node.nodeid, evidence=out[out.find("hpcsgd: rank 3"):][:400])


def test_exception_in_a_thread_aborts_the_job():
    """A background thread's uncaught exception aborts the job too (threading.excepthook)."""
    code = ("import threading, hpcsgd.runtime.abort\n"
            "from mpi4py import MPI\n"
            "hpcsgd.runtime.abort.install()\n"
            "c = MPI.COMM_WORLD\n"
            "def loader():\n"
            "    raise OSError('deliberate: loader thread died on rank %d' % c.rank)\n"
            "if c.rank == 1:\n"
            "    threading.Thread(target=loader, name='loader').start()\n"
            "c.Barrier(); c.Barrier()\n"
            "import time; time.sleep(60)\n")
    res = run_job([sys.executable, "-c", code], 2, timeout=30)
    assert not res.timed_out and res.returncode != 0, res.output
    assert "in thread 'loader'" in res.output and "deliberate: loader thread died on rank 1" in res.output
    assert res.seconds < 10, res.seconds


def test_sigkilled_rank_ends_the_job(request, tmp_path):
    """Fault 2a: a rank SIGKILLed mid-iteration; nobody hangs (MPICH's launcher ends the job)."""
    res = run_job([sys.executable, *CHECK[1:], "kill", "2", "25"], 4, timeout=40,
                  env={"HPCSGD_COLLECTIVE_TIMEOUT": "5", "HPCSGD_WATCHDOG_DIR": tmp_path,
                       "CHECK_FAULT_PID_DIR": tmp_path})
    assert not res.timed_out, res.output
    assert res.returncode != 0, res.output
    assert " ok " not in res.output
    detect = res.detect_seconds()
    assert detect is not None and detect < 10, (detect, res.output)
    for pid in _pids(tmp_path).values():
        assert _gone(pid), f"rank process {pid} survived"
    record("f2a_rank_sigkilled", order=2.0, fault="A rank is SIGKILLed mid-iteration",
           injected="rank 2 of 4 SIGKILLs itself between compute and allreduce (iteration 25)",
           outcome="MPICH's hydra sees the dead process and kills the job before the collective "
                   f"timeout; exit code {res.returncode}; hydra's banner names the host and a pid "
                   "(not always the dead one's)",
           detect_s=detect, bound_s=10, data_lost="work since the last checkpoint",
           test=request.node.nodeid, evidence=res.output[res.output.find("BAD TERMINATION"):][:300])


def test_frozen_rank_trips_the_collective_watchdog(request, tmp_path):
    """Fault 2b: a rank hangs (SIGSTOP); the watchdog aborts naming the collective and the missing rank."""
    timeout = 3.0
    res = run_job([sys.executable, *CHECK[1:], "freeze", "1", "10"], 4, timeout=40,
                  env={"HPCSGD_COLLECTIVE_TIMEOUT": str(timeout), "HPCSGD_WATCHDOG_HEARTBEAT": "0.5",
                       "HPCSGD_WATCHDOG_DIR": tmp_path, "CHECK_FAULT_PID_DIR": tmp_path})
    out = res.output
    pids = _pids(tmp_path)
    if 1 in pids and not _gone(pids[1]):  # never leave a stopped process behind
        os.kill(pids[1], signal.SIGKILL)
    assert not res.timed_out, out
    assert res.returncode == watchdog.ABORT_CODE, (res.returncode, out)
    assert "collective timeout: collective 'allreduce' (#" in out, out
    assert "iteration=10" in out, out
    assert "ranks that did not arrive: 1\n" in out, out
    assert "no heartbeat" in out and f"pid {pids[1]}" in out, out
    assert "ranks waiting in 'allreduce': 0, 2, 3" in out, out
    assert f"board: {tmp_path}" in out, out
    detect = res.detect_seconds()
    assert detect is not None and timeout <= detect < timeout + 7, (detect, out)
    record("f2b_rank_frozen", order=2.1, fault="A rank hangs (frozen, SIGSTOP) mid-iteration",
           injected=f"rank 1 of 4 SIGSTOPs itself before the allreduce of iteration 10; "
                    f"HPCSGD_COLLECTIVE_TIMEOUT={timeout:g}",
           outcome="collective watchdog aborts the job (exit code 3) with: collective 'allreduce' #, "
                   "ranks that did not arrive: 1 (no heartbeat), ranks waiting: 0, 2, 3",
           detect_s=detect, bound_s=timeout + 7, data_lost="work since the last checkpoint",
           test=request.node.nodeid, evidence=out[out.find("collective timeout"):][:500])


# -- the watchdog's logic, no MPI ---------------------------------------------------

def _st(rank, op=None, seq=7, hb_age=0.0, since_age=0.0, host="h0", pid=None, now=1000.0):
    st = {"rank": rank, "host": host, "pid": pid or 10**7 + rank, "heartbeat": now - hb_age}
    if op:
        st.update(op=op, op_seq=seq, since=now - since_age)
    else:
        st.update(op=None, last_op="allreduce", last_seq=seq - 1, since=now - since_age)
    return st


def test_explain_names_busy_dead_mismatched_and_unknown_ranks():
    board = {0: _st(0, "allreduce"), 1: _st(1, None, since_age=42.0), 2: _st(2, "bcast", seq=6),
             3: _st(3, None, hb_age=9.0, host="elsewhere"), 5: _st(5, "allreduce")}
    rep = board_reader.explain(board, 7, name="allreduce", here="h0", stale_after=3.0, now=1000.0)
    text = "\n".join(rep.lines)
    assert rep.waiting == [0, 5] and rep.missing == [1, 2, 3] and rep.unknown == [4, 6], text
    assert "ranks that did not arrive: 1, 2, 3" in text
    assert "rank 1 (host h0" in text and "busy outside collectives for 42.0 s" in text
    assert "in a different collective 'bcast' (#6) (collective mismatch)" in text
    assert "no heartbeat for 9.0 s (dead, frozen or unreachable)" in text
    assert "ranks whose state is unknown (no board entry): 4, 6" in text
    assert "ranks waiting in 'allreduce': 0, 5" in text


def test_explain_dead_local_process_and_stuck_network():
    board = {0: _st(0, "allreduce"), 1: _st(1, "allreduce", hb_age=5.0, pid=2**22 + 12345)}
    rep = board_reader.explain(board, 2, name="allreduce", here="h0", stale_after=3.0, now=1000.0)
    assert rep.missing == [1] and "process gone" in "\n".join(rep.lines)
    board = {r: _st(r, "allreduce") for r in range(4)}
    rep = board_reader.explain(board, 4, name="allreduce", here="h0", now=1000.0)
    assert rep.missing == [] and "stuck in the network" in "\n".join(rep.lines)


def test_collective_marks_and_counts():
    before = watchdog.sequence()
    assert watchdog.current() is None
    with watchdog.collective("allreduce", nbytes=8):
        name, start = watchdog.current()
        assert name == "allreduce" and abs(start - time.time()) < 5
        with watchdog.collective("bcast"):
            assert watchdog.current()[0] == "bcast"
        assert watchdog.current()[0] == "allreduce"
    assert watchdog.current() is None
    assert watchdog.sequence() == before + 2


def test_timeout_from_env(monkeypatch):
    monkeypatch.setenv(watchdog.TIMEOUT_ENV, "12.5")
    assert watchdog.timeout_from_env() == 12.5
    monkeypatch.setenv(watchdog.TIMEOUT_ENV, "0")
    assert watchdog.timeout_from_env() == 0
    monkeypatch.delenv(watchdog.TIMEOUT_ENV)
    assert watchdog.timeout_from_env() == watchdog.DEFAULT_TIMEOUT
    for bad in ("soon", "-1"):
        monkeypatch.setenv(watchdog.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=watchdog.TIMEOUT_ENV):
            watchdog.timeout_from_env()


def test_postmortem_reads_an_abandoned_board(tmp_path):
    import json

    board = tmp_path / "hpcsgd-watchdog-abc123"
    board.mkdir()
    now = time.time()
    for r in range(3):
        st = _st(r, "allreduce" if r != 2 else None, hb_age=0.0 if r != 2 else 6.0, now=now)
        st["size"] = 3
        (board / f"rank{r}.json").write_text(json.dumps(st))
    reports = board_reader.postmortem(tmp_path, remove=True)
    assert len(reports) == 1 and "job abc123 ended abnormally" in reports[0], reports
    assert "ranks that did not arrive: 2" in reports[0] and "ranks waiting in 'allreduce': 0, 1" in reports[0]
    assert not board.exists()
