"""benchmarks/_machine.py: what a benchmark's JSON records of the CPU, from a cpuinfo text of our own."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import cpu_model, machine  # noqa: E402

# Two processors each: only the first block counts (a later block must not override it).
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: INTEL(R) XEON(R) PLATINUM 8581C CPU @ 2.30GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: some other model
flags\t\t: fpu sse sse2
"""

EPYC_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni vaes

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma avx512f
"""


def _cpuinfo(tmp_path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, model, family, number, vector", [
    (XEON, "INTEL(R) XEON(R) PLATINUM 8581C CPU @ 2.30GHz", 6, 207, "avx512"),
    (EPYC_ZEN3, "AMD EPYC 7B13", 25, 1, "avx2"),
], ids=["xeon_avx512", "epyc_zen3_avx2"])
def test_cpu_from_cpuinfo(tmp_path, text, model, family, number, vector):
    path = _cpuinfo(tmp_path, text)
    m = machine(cpuinfo=path)
    assert (m["cpu_model"], m["cpu_family"], m["cpu_model_number"], m["vector_class"]) == \
           (model, family, number, vector)
    assert cpu_model(cpuinfo=path) == model


def test_avx2_needs_fma(tmp_path):
    path = _cpuinfo(tmp_path, EPYC_ZEN3.split("\n\n")[0].replace(" fma", "") + "\n")
    assert machine(cpuinfo=path)["vector_class"] == "other"


@pytest.mark.parametrize("text", ["", None], ids=["empty_file", "missing_file"])
def test_no_cpuinfo_falls_back_to_platform(tmp_path, monkeypatch, text):
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "fake-arch")
    path = _cpuinfo(tmp_path, text) if text is not None else str(tmp_path / "absent")
    m = machine(cpuinfo=path)
    assert (m["cpu_model"], m["cpu_family"], m["cpu_model_number"], m["vector_class"]) == \
           ("fake-arch", None, None, "other")
    assert cpu_model(cpuinfo=path) == "fake-arch"


def test_environment_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    m = machine(cpuinfo=_cpuinfo(tmp_path, XEON))
    assert m["openblas_coretype_env"] == "Haswell"
    assert m["cpus"] == os.cpu_count()
    assert len(m["loadavg"]) == 3
    assert m["hostname"] and m["python"].count(".") == 2
