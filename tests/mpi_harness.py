"""Launch MPI programs from pytest with a hard timeout and a hang report.

``run_mpi(script, n)`` runs ``mpiexec -n N python -m mpi4py tests/mpi/_launch.py
SCRIPT ARGS`` and fails the test when the job exits non-zero or outlives its
timeout. Every rank arms a stack dump shortly before the timeout (see
``tests/mpi/_launch.py``); on a hang the failure message lists, for each rank
that was stuck, the collective it was in and its Python stack.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "tests" / "mpi" / "_launch.py"
DEFAULT_TIMEOUT = float(os.environ.get("HPCSGD_TEST_TIMEOUT", "120"))


def mpiexec_path() -> str:
    """The mpiexec next to this Python (the venv's MPICH wheel), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("mpiexec not found: run scripts/setup.sh (installs the mpich wheel)")
    return found


@dataclass
class MPIResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class MPIHang(AssertionError):
    pass


class MPIFailure(AssertionError):
    pass


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def run_mpi(script: str | os.PathLike, n: int, args: list[str] | tuple = (), *,
            timeout: float | None = None, env: dict | None = None,
            check: bool = True, mpiexec_args: list[str] | tuple = ()) -> MPIResult:
    """Run ``script`` on ``n`` ranks; raise on non-zero exit or on a hang.

    Args:
        script: path of a Python file, relative to the repository root or absolute.
        n: number of ranks.
        timeout: seconds before the job counts as hung (default $HPCSGD_TEST_TIMEOUT or 120).
        env: extra environment variables for every rank (e.g. HPCSGD_RANKS_PER_NODE).
        check: raise MPIFailure on a non-zero exit (hangs always raise MPIHang).
    """
    import time

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    script = Path(script)
    if not script.is_absolute():
        script = ROOT / script
    stuck_dir = tempfile.mkdtemp(prefix="hpcsgd-stuck-")
    full_env = dict(os.environ)
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    full_env["HPCSGD_TEST_STUCK_DIR"] = stuck_dir
    full_env["HPCSGD_TEST_DUMP_AFTER"] = str(max(timeout - 5.0, timeout * 0.8))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [mpiexec_path(), "-n", str(n), *mpiexec_args, sys.executable, "-m", "mpi4py",
           str(LAUNCH), str(script), *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=str(ROOT), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    seconds = time.perf_counter() - t0
    dumps = {}
    for path in sorted(glob.glob(os.path.join(stuck_dir, "stuck.rank*.txt"))):
        text = Path(path).read_text()
        if text.strip():
            dumps[Path(path).stem.replace("stuck.", "")] = text
    shutil.rmtree(stuck_dir, ignore_errors=True)
    res = MPIResult(proc.returncode, out, err, seconds)
    if hung or dumps:
        report = "\n".join(f"--- {r} was stuck:\n{_tail(t, 3000)}" for r, t in dumps.items())
        raise MPIHang(
            f"{' '.join(cmd[:3])} {script.name} hung (timeout {timeout:.0f} s, ran {seconds:.1f} s); "
            f"stuck ranks: {sorted(dumps) or 'unknown'}\n{report}\n"
            f"--- stdout:\n{_tail(out)}\n--- stderr:\n{_tail(err)}")
    if check and proc.returncode != 0:
        raise MPIFailure(
            f"{script.name} on {n} ranks exited {proc.returncode}\n"
            f"--- stdout:\n{_tail(out)}\n--- stderr:\n{_tail(err)}")
    return res
