"""`hpcsgd train` with bad files: on_bad from the config, skipped files named across ranks, exact resume.

The rank-side checks are in tests/mpi/check_train_bad_data.py (one launch runs them all).
"""

import subprocess
import sys

import numpy as np
import pytest
from mpi_harness import ROOT, mpiexec_path
from PIL import Image

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n, env", [
    (2, {}),
    pytest.param(1, {}, marks=pytest.mark.slow),
    pytest.param(4, {"HPCSGD_RANKS_PER_NODE": "2"}, marks=pytest.mark.slow, id="4-2nodes"),
])
def test_skip_names_every_ranks_bad_files_and_resumes_exactly(mpirun, tmp_path, n, env):
    res = mpirun("tests/mpi/check_train_bad_data.py", n, [str(tmp_path)], env=env, timeout=300)
    assert res.stdout.count("bad data checks ok") == n, res.stdout


def _tiny_list(root, bad_name, write_bad):
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i}.JPEG" for i in range(7)]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / n)
    write_bad(root / bad_name)
    for split in ("train", "val"):
        lines = [f"{n} {i % 2}\n" for i, n in enumerate(names + [bad_name])]
        (root / f"{split}.txt").write_text("".join(lines))


@pytest.mark.parametrize("bad_name, write_bad, cause", [
    ("zero.JPEG", lambda p: p.write_bytes(b""), "not a readable image"),
    ("gone.JPEG", lambda p: None, "file not found"),
])
def test_on_bad_error_stops_naming_the_file(tmp_path, bad_name, write_bad, cause):
    root = tmp_path / "data"
    _tiny_list(root, bad_name, write_bad)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: resnet_small\nmodel_options: {{depth: 8, width: 2}}\ndataset: imagenet_list\n"
                   f"data_path: {root}\nbatch_per_rank: 8\nloader_workers: 0\nkernels: false\n"
                   "progress: false\neval_interval: 0\n")
    p = subprocess.run([sys.executable, "-m", "hpcsgd", "train", str(cfg), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])  # data error: never restarted
    assert f"{root / bad_name}: {cause}" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("bad, key", [
    ("dataset: imagenet_list\ndata_path: .\ndataset_options: {on_bad: skip}\n", "'dataset_options.on_bad'"),
    ("dataset: imagenet_list\ndata_path: .\ndataset_options: {root: ., bad: 1}\n", "does not use 'bad'"),
    ("dataset: synthetic\nlabel_smoothing: 1.5\n", "'label_smoothing' must be in [0, 1)"),
    ("dataset: synthetic\nmodel_options: {widht: 4}\n", "does not use 'widht'"),
])
def test_unused_options_exit_before_any_collective(tmp_path, bad, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(bad)
    p = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, "-m", "hpcsgd", "train", str(cfg),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count(key) == 1, p.stderr  # said once (rank 0), every rank exits 2
    assert not (tmp_path / "out").exists(), "nothing may run before the config is valid"
