"""benchmarks/gpu_validate.sh on a machine without a GPU: skips cleanly, or (with a stand-in
nvidia-smi) runs every step to the end and records each outcome."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_validate.sh"
STEPS = ["install", "environment", "tests", "main_job", "allreduce", "resnet50"]


def _run(tmp_path, env, timeout=60):
    full = dict(os.environ, HPCSGD_GPU_OUT=str(tmp_path / "out"), **env)
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full, timeout=timeout,
                       cwd=tmp_path)
    return r, json.loads((tmp_path / "out" / "gpu_validate.json").read_text())


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("forced", [True, False])
def test_without_a_gpu_every_step_is_skipped_with_the_reason(tmp_path, forced):
    if not forced and shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    r, res = _run(tmp_path, {"HPCSGD_GPU_VALIDATE_NO_GPU": "1"} if forced else {"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    reason = "HPCSGD_GPU_VALIDATE_NO_GPU=1" if forced else "nvidia-smi not found"
    assert reason in res["skipped_reason"] and res["gpu_present"] is False
    assert [s["step"] for s in res["steps"]] == STEPS
    assert all(s["status"] == "skipped" and reason in s["detail"] for s in res["steps"])
    assert "GPU validation summary" in r.stdout and reason in r.stdout


@pytest.mark.slow
def test_with_a_stand_in_gpu_every_step_runs_and_failures_are_recorded(tmp_path):
    """nvidia-smi says there is a GPU, pip cannot install, CuPy is missing: no step may stop the others."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    # a venv whose pip refuses (no index here) and whose python is this interpreter
    (bin_dir / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "no index reachable" >&2; exit 1; fi\n'
        f'exec {sys.executable} "$@"\n')
    for f in ("nvidia-smi", "python"):
        (bin_dir / f).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HPCSGD_VENV": str(tmp_path / "venv"),
           "HPCSGD_DATA": str(tmp_path / "no-data"), "HPCSGD_GPU_BUDGET": "300"}
    r, res = _run(tmp_path, env, timeout=400)
    status = {s["step"]: s for s in res["steps"]}
    assert list(status) == STEPS and res["gpu_present"] is True
    assert r.returncode == 1  # some steps failed, and the script still ran to the end
    assert status["install"]["status"] == "failed" and "no index reachable" in status["install"]["detail"]
    assert status["main_job"]["status"] == "failed"
    assert "Fashion-MNIST not found" in status["main_job"]["detail"]
    for step in ("environment", "allreduce", "resnet50"):  # no CuPy / no CUDA device here
        assert status[step]["status"] == "failed", status[step]
    assert status["tests"]["status"] == "ok", (tmp_path / "out" / "logs" / "tests.log").read_text()[-3000:]
    assert all((tmp_path / "out" / s["log"]).exists() for s in res["steps"])
