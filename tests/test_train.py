"""`hpcsgd train` under mpiexec: end-to-end run, bitwise resume, checksum fallback, bad configs.

The rank-side checks are in tests/mpi/check_train.py (one launch runs them all).
"""

import subprocess
import sys
import time

import pytest
from mpi_harness import ROOT, mpiexec_path

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n, env", [
    (2, {}),
    pytest.param(1, {}, marks=pytest.mark.slow),
    pytest.param(4, {"HPCSGD_RANKS_PER_NODE": "2"}, marks=pytest.mark.slow, id="4-2nodes"),
])
def test_train_resume_bitwise(mpirun, tmp_path, n, env):
    res = mpirun("tests/mpi/check_train.py", n, [str(tmp_path)], env=env, timeout=240)
    assert res.stdout.count("train checks ok") == n, res.stdout


@pytest.mark.parametrize("bad, key", [
    ("epochs: 1\nbatch_size: 3\n", "unknown config key 'batch_size'"),
    ("batch_per_rank: 8\nglobal_batch: 20\n", "config key 'global_batch'=20 is not divisible by ranks x "
                                              "batch_per_rank = 2 x 8 = 16"),
    ("dataset: fashion_mnist\ndata_path: /nonexistent/fmnist\n", "'data_path': dataset path"),
])
def test_bad_config_exits_cleanly_on_all_ranks(tmp_path, bad, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(bad)
    t0 = time.perf_counter()
    p = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, "-m", "hpcsgd", "train", str(cfg),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count(key) == 1, p.stderr  # said once (rank 0), every rank exits 2
    assert not (tmp_path / "out").exists(), "nothing may run before the config is valid"
    assert time.perf_counter() - t0 < 30


def test_gpu_without_cupy_is_a_config_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("gpu: true\ndataset: synthetic\ndataset_options: {shape: [1, 8, 8], n: 64}\n")
    p = subprocess.run([sys.executable, "-m", "hpcsgd", "train", str(cfg), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "config key 'gpu'" in p.stderr, p.stderr
