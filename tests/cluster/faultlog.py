"""Fault tests record what happened as JSON; scripts/fault_table.py makes the fault table of it.

Each fault test calls :func:`record` once its assertions passed, writing
``$HPCSGD_FAULT_RESULTS/<key>.json``. Unset, results go to a temporary folder, so
running the tests never changes the repository; to refresh the committed table:

    HPCSGD_FAULT_RESULTS=benchmarks/results/faults bash scripts/test.sh -k fault
    python scripts/fault_table.py && python scripts/sync_docs.py
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS_ENV = "HPCSGD_FAULT_RESULTS"


def results_dir() -> Path:
    """Where results go: ``$HPCSGD_FAULT_RESULTS``, else a temporary folder (not the repository)."""
    return Path(os.environ.get(RESULTS_ENV) or Path(tempfile.gettempdir()) / "hpcsgd-fault-results")


def record(key: str, *, order: float, fault: str, injected: str, outcome: str,
           detect_s: float | None, data_lost: str, test: str, bound_s: float | None = None,
           evidence: str = "") -> Path:
    """Write one fault's result.

    Args:
        key: file name (no extension), e.g. "f1_rank_raises".
        order: sort key of the row in the table (the fault number in the issue).
        fault / injected / outcome / data_lost: the table's columns, plain text.
        detect_s: seconds from injection to the job's end (or to the error), measured.
        test: pytest node id that produced it.
        bound_s: the time bound the test asserts.
        evidence: a short excerpt of the output that shows the outcome.
    """
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    data = {"key": key, "order": order, "fault": fault, "injected": injected, "outcome": outcome,
            "detect_s": None if detect_s is None else round(float(detect_s), 2), "bound_s": bound_s,
            "data_lost": data_lost, "test": test, "evidence": evidence[-600:],
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
            "loadavg": list(os.getloadavg())}
    path = out / f"{key}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
