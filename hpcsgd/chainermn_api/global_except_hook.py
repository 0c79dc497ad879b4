"""``chainermn.global_except_hook``: abort the whole MPI job on an uncaught exception.

``add_hook()`` installs :func:`hpcsgd.runtime.abort.install`: an uncaught exception in
any thread prints the rank banner and the traceback, then calls
``MPI.COMM_WORLD.Abort(1)`` so the other ranks do not wait forever in their
next collective. As in ChainerMN, ``import hpcsgd`` installs it when the
environment variable ``CHAINERMN_FORCE_ABORT_ON_EXCEPTION`` is non-empty.

Differences from ChainerMN: threads are covered too (``threading.excepthook``);
``SystemExit`` ends the rank normally instead of aborting; a second ``add_hook()``
is a silent no-op (ChainerMN warns).
"""

from __future__ import annotations

import os

from hpcsgd.runtime import abort

ENV = "CHAINERMN_FORCE_ABORT_ON_EXCEPTION"


def add_hook() -> None:
    """Make an uncaught exception on this rank abort every rank (idempotent)."""
    abort.install()


def remove_hook() -> None:
    """Restore Python's default exception hooks."""
    abort.uninstall()


def _add_hook_if_enabled() -> None:
    if os.environ.get(ENV):
        add_hook()
