"""Fault 6 of the fault table: float16 overflow in the gradients skips the step, counted and logged."""

import re

import pytest
from cluster.faultlog import record

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("name", ["hierarchical", "flat"])
def test_fp16_overflow_skips_the_step(mpirun, request, name, installed):
    if not installed(name):
        pytest.skip(f"communicator {name!r} has not landed yet")
    res = mpirun("tests/mpi/check_fault_overflow.py", 4, [name], timeout=120,
                 env={"HPCSGD_RANKS_PER_NODE": "2"})
    out = res.stdout + res.stderr
    assert out.count("overflow ok") == 4, out
    assert "skipping update" in out, f"the skipped step was not logged:\n{out}"
    detect = max(float(x) for x in re.findall(r"detect_s=([0-9.]+)", out))
    if name == "hierarchical":
        record("f6_fp16_overflow", order=6, fault="float16 overflow in the gradients",
               injected="a gradient of 3e5 on one of 4 ranks (2 virtual nodes x 2), float16 on the wire "
                        f"({name} communicator, half_scaling='predivide': the default per-message scale "
                        "carries 3e5 without overflow)",
               outcome="GradientOverflowError on every rank; the multi-node optimizer skips the update, "
                       "counts it (skipped_steps=1) and logs it; parameters unchanged and finite; the next "
                       "step updates",
               detect_s=detect, data_lost="one update (that step's gradients)", test=request.node.nodeid,
               evidence=next((ln for ln in out.splitlines() if "skipping update" in ln), "")[:300])
