"""`hpcsgd train` logs the gradient noise scale (under mpiexec), and the `hpcsgd noise-scale` probe.

The rank-side checks are in tests/mpi/check_noise_scale.py (one launch runs every case of its size).
"""

import json
import subprocess
import sys

import pytest
from mpi_harness import ROOT, mpiexec_path

pytestmark = pytest.mark.mpi

TINY = """model: resnet_small
model_options: {depth: 8, width: 4}
dataset: synthetic
dataset_options: {shape: [1, 8, 8], n_classes: 4, n: 400, pool: 16}
batch_per_rank: 4
recipe: sgd
kernels: false
loader_workers: 0
progress: false
"""


@pytest.mark.parametrize("n, env", [
    (2, {}),
    (1, {}),
    pytest.param(4, {"HPCSGD_RANKS_PER_NODE": "2"}, marks=pytest.mark.slow, id="4-2nodes"),
])
def test_train_logs_the_noise_scale(mpirun, tmp_path, n, env):
    res = mpirun("tests/mpi/check_noise_scale.py", n, [str(tmp_path)], env=env, timeout=300)
    assert res.stdout.count("noise scale checks ok") == n, res.stdout


def probe(tmp_path, *args, ranks=None):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    launch = [mpiexec_path(), "-n", str(ranks)] if ranks else []
    return subprocess.run([*launch, sys.executable, "-m", "hpcsgd", "noise-scale", str(cfg), *args],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)


def test_probe_prints_the_noise_scale_and_a_recommendation(tmp_path):
    p = probe(tmp_path, "--steps", "12", "--json", "--growth", "2")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)  # stdout is the result alone; the run's banner goes to stderr
    assert r["ranks"] == 1 and r["micro_batches"] == 2, r  # one process: two micro-batches by default
    assert r["b_small"] == 4 and r["b_big"] == 8 and r["steps"] == 12
    assert len(r["b_noise_raw_intervals"]) == 12  # log interval = steps // 10 = 1: a record per step
    b = r["b_noise_second_half"]
    if b is None:
        assert r["recommended_max_global_batch"] is None
    else:
        unit = r["batch_unit"]
        assert r["recommended_max_global_batch"] == max(unit, int(b * 2 // unit) * unit)


def test_probe_under_mpiexec_uses_the_ranks_as_the_second_batch_size(tmp_path):
    p = probe(tmp_path, "--steps", "4", "--json", ranks=2)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)  # printed once, by rank 0
    assert r["ranks"] == 2 and r["micro_batches"] == 1 and r["b_small"] == 4 and r["b_big"] == 8, r


def test_probe_text_output(tmp_path):
    p = probe(tmp_path, "--steps", "6", "--micro-batches", "3")
    assert p.returncode == 0, p.stderr
    assert "B_small = 4 (one micro-batch), B_big = 12" in p.stdout, p.stdout
    assert "B_noise smoothed" in p.stdout and ("recommended largest global batch" in p.stdout
                                               or "no recommendation" in p.stdout), p.stdout


@pytest.mark.parametrize("args, msg", [
    (["--steps", "1"], "--steps must be >= 2"),
    (["--micro-batches", "1"], "no second batch size"),
    (["--growth", "0.5"], "--growth must be >= 1"),
])
def test_probe_bad_input_is_a_clear_error(tmp_path, args, msg):
    p = probe(tmp_path, *args)
    assert p.returncode == 2 and msg in p.stderr, (p.returncode, p.stderr)
