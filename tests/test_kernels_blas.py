"""hpcsgd.blas: the OPENBLAS_CORETYPE decision on injected inputs; the environment stays as found."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpcsgd import blas

AVX512 = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
AVX2 = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize("arch,flags,expected", [
    ("Prescott", AVX512, "SkylakeX"),      # the Emerald Rapids trap
    ("Haswell", AVX512, "SkylakeX"),       # AVX2 kernel on an AVX-512 CPU
    ("Prescott", AVX2, "Haswell"),
    ("Nehalem", AVX2, "Haswell"),
    ("SkylakeX", AVX512, None),
    ("Cooperlake", AVX512, None),
    ("Haswell", AVX2, None),
    ("Zen", AVX2, None),
    ("Prescott", {"sse4_2", "avx"}, None),  # nothing better to pick
])
def test_decide(arch, flags, expected):
    coretype, line = blas.decide(arch, flags, version="0.3.23.dev")
    assert coretype == expected
    assert line.startswith("hpcsgd.blas:") and "\n" not in line
    if expected:
        assert f"OPENBLAS_CORETYPE={expected}" in line and arch in line


def test_cpu_coretype_follows_the_vector_class():
    """A pinned benchmark kernel must run on the CPU: SkylakeX on an AVX2-only CPU is SIGILL."""
    assert blas.cpu_coretype(AVX512) == "SkylakeX"
    assert blas.cpu_coretype(AVX2) == "Haswell"  # AMD Zen 3, Intel Haswell..Ice Lake client
    assert blas.cpu_coretype({"sse4_2", "avx"}) is None


def test_decide_user_setting_wins_and_old_openblas():
    assert blas.decide("Prescott", AVX512, user_value="Haswell")[0] is None
    assert blas.decide("Prescott", AVX512, version="0.2.20")[0] == "Haswell"
    assert blas.decide(None, AVX512)[0] is None


def _probe(arch):
    return lambda environ=None: {"architecture": arch, "version": "0.3.23"}


def test_select_coretype_sets_only_the_given_mapping():
    before = dict(os.environ)
    env = {}
    line = blas.select_coretype(env, probe=_probe("Prescott"), cpu_flags=AVX512, numpy_loaded=False)
    assert env[blas.ENV] == "SkylakeX" and "selecting" in line
    # a second call (e.g. hpcsgd train after the job script's --export) keeps it
    assert "kept" in blas.select_coretype(env, probe=_probe("SkylakeX"), cpu_flags=AVX512, numpy_loaded=False)
    assert dict(os.environ) == before


def test_select_coretype_respects_user_late_and_disabled():
    env = {blas.ENV: "Haswell"}
    line = blas.select_coretype(env, probe=_probe("Prescott"), cpu_flags=AVX512, numpy_loaded=False)
    assert env[blas.ENV] == "Haswell" and "set by the user" in line
    assert env[blas.THREAD_TIMEOUT_ENV] == blas.THREAD_TIMEOUT
    env = {}
    line = blas.select_coretype(env, probe=_probe("Prescott"), cpu_flags=AVX512, numpy_loaded=True)
    assert env == {} and "already imported" in line
    env = {blas.DISABLE_ENV: "0"}
    blas.select_coretype(env, probe=_probe("Prescott"), cpu_flags=AVX512, numpy_loaded=False)
    assert env == {blas.DISABLE_ENV: "0"}
    env = {blas.THREAD_TIMEOUT_ENV: "10"}
    blas.select_coretype(env, probe=_probe("SkylakeX"), cpu_flags=AVX512, numpy_loaded=False)
    assert env == {blas.THREAD_TIMEOUT_ENV: "10"}


def test_read_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert blas.read_cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "fma", "avx512f"}
    assert blas.read_cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_probe_and_cli_run_in_subprocesses():
    info = blas.probe_openblas()
    assert set(info) == {"architecture", "version"}
    env = {k: v for k, v in os.environ.items() if k != blas.ENV}
    out = subprocess.run([sys.executable, "-m", "hpcsgd.blas", "--export"], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stderr.startswith("hpcsgd.blas:")
    assert out.stdout == "" or out.stdout.startswith("export ")


def test_blas_module_does_not_import_numpy():
    code = "import sys, hpcsgd.blas; assert 'numpy' not in sys.modules, 'numpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_check_reports_kernel_speed_and_float64_error_without_changing_anything():
    import threadpoolctl  # noqa: F401  (its import sets KMP_DUPLICATE_LIB_OK; not check's doing)

    before = dict(os.environ)
    r = blas.check(n=256, repeats=1)
    assert dict(os.environ) == before
    assert r["n"] == 256 and r["sgemm_gflops"] > 0
    # float32 GEMM of uniform [-1, 1) matrices: error ~ sqrt(n) * 2**-24 ~ 1e-6, far below 1e-4
    assert 0 <= r["rel_error"] < 1e-5 and r["ok"]
    assert r["coretype_env"] == os.environ.get("OPENBLAS_CORETYPE")
