"""Rank-side bootstrap for MPI test scripts (see tests/mpi_harness.py).

Run as ``python -m mpi4py tests/mpi/_launch.py SCRIPT [ARGS...]``. It arms a
per-rank hang dump before running SCRIPT: if the rank is still running after
``$HPCSGD_TEST_DUMP_AFTER`` seconds, faulthandler writes every thread's stack
to ``$HPCSGD_TEST_STUCK_DIR/stuck.rank<R>.txt`` (with the collective the rank
is in, if any) and exits, so the harness can say which ranks were stuck where.
``python -m mpi4py`` turns an uncaught exception on any rank into MPI_Abort,
so one failing rank never leaves the others hanging.
"""

import faulthandler
import os
import runpy
import sys
import threading
import zlib

from mpi4py import MPI


def _arm(rank: int) -> None:
    after = float(os.environ.get("HPCSGD_TEST_DUMP_AFTER", "0") or 0)
    out_dir = os.environ.get("HPCSGD_TEST_STUCK_DIR")
    if after <= 0 or not out_dir:
        return
    path = os.path.join(out_dir, f"stuck.rank{rank}.txt")
    f = open(path, "w")  # kept open for faulthandler  # noqa: SIM115

    def _note_collective() -> None:
        # Runs just before faulthandler fires: name the collective in progress.
        try:
            from hpcsgd.runtime import watchdog

            op = watchdog.current()
            f.write(f"rank {rank}: in collective {op[0] if op else 'none known'}\n")
            f.flush()
        except Exception:
            pass

    t = threading.Timer(max(after - 0.5, 0.1), _note_collective)
    t.daemon = True
    t.start()
    faulthandler.dump_traceback_later(after, exit=True, file=f)


def _seed(argv: list, rank: int) -> None:
    """Seed ``random`` and NumPy's global RNG (Chainer's initializers draw from it).

    The seed depends on the script, its arguments and the rank: ranks differ as in a real
    job (an unseeded replica still has to be broadcast), and every run repeats exactly.
    """
    import random

    import numpy as np

    seed = zlib.crc32(" ".join([os.path.basename(argv[0]), *argv[1:], f"rank{rank}"]).encode())
    random.seed(seed)
    np.random.seed(seed)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: _launch.py SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    _arm(MPI.COMM_WORLD.Get_rank())
    _seed(sys.argv, MPI.COMM_WORLD.Get_rank())
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


main()
