"""``hpcsgd train`` that lingers before exiting: the window in which a test cuts a host's link.

Usage (as ``hpcsgd launch --entry``): ``python tests/cluster/train_then_wait.py train ARGS...``.
Runs ``hpcsgd train ARGS`` with the collective watchdog on; after a successful run
(every rank has written its completion marker) it sleeps ``$HPCSGD_TEST_LINGER``
seconds before exiting, so that MPI_Finalize (at interpreter exit) starts only
after the test has cut the link, whatever the machine's speed.
"""

import os
import sys
import time

import hpcsgd.runtime.abort
import hpcsgd.runtime.watchdog

hpcsgd.runtime.abort.install()
hpcsgd.runtime.watchdog.install()
from hpcsgd.cli import main  # noqa: E402

rc = main(sys.argv[1:])
if rc == 0:
    time.sleep(float(os.environ.get("HPCSGD_TEST_LINGER", "0")))
sys.exit(rc)
