"""Faults 4 and 5 of the fault table: a damaged checkpoint, a disk that fills during a checkpoint write.

They go through hpcsgd.train.checkpoint's public functions (``save_checkpoint`` is collective:
here over the single-process MPI world). The disk-full test mounts a real, small tmpfs
(needs root; skipped otherwise) so the ENOSPC comes from the kernel, not from a mock.
"""

import hashlib
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from cluster.faultlog import record

ckpt = pytest.importorskip("hpcsgd.train.checkpoint")
from hpcsgd.errors import CheckpointError  # noqa: E402


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _state(iteration: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"iteration": iteration, "arrays": {"model/w": rng.standard_normal(n).astype(np.float32),
                                               "model/b": np.full(3, float(iteration), np.float32)},
            "meta": {"iteration": iteration}, "rank_state": {"rng": seed}}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _flip_bit(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 3)


@pytest.mark.parametrize("damage", ["bit_flip", "truncated"])
def test_damaged_checkpoint_falls_back_to_previous(tmp_path, request, damage):
    """Fault 4: the newest checkpoint is damaged; resume says so and loads the previous good one."""
    d = str(tmp_path / "checkpoints")
    comm = _world()
    ckpt.save_checkpoint(d, _state(100, 5000, 1), comm)
    newest = ckpt.save_checkpoint(d, _state(200, 5000, 2), comm)
    (_flip_bit if damage == "bit_flip" else _truncate)(newest)
    messages = []
    t0 = time.perf_counter()
    loaded = ckpt.load_latest(d, log=messages.append)
    detect = time.perf_counter() - t0
    assert loaded is not None and loaded.iteration == 100, loaded
    np.testing.assert_array_equal(loaded.arrays["model/w"], _state(100, 5000, 1)["arrays"]["model/w"])
    text = "\n".join(messages)
    assert os.path.basename(newest) in text and "checksum" in text and "falling back" in text, text
    # The collective resume path agrees (rank 0 verifies, broadcasts the bytes).
    again = ckpt.load_for_resume(d, comm, log=lambda m: None)
    assert again.iteration == 100
    how = ("one bit flipped in the middle of the newest .npz" if damage == "bit_flip"
           else "newest .npz truncated to a third")
    record(f"f4_checkpoint_{damage}", order=4.0 if damage == "bit_flip" else 4.1,
           fault=f"Checkpoint {'has a flipped bit' if damage == 'bit_flip' else 'is truncated'}",
           injected=how, outcome="resume reports the sha256 mismatch naming the file and loads the previous "
                                 "good checkpoint (iteration 100 instead of 200)",
           detect_s=detect, data_lost="the iterations since the previous checkpoint (100)",
           test=request.node.nodeid, evidence=text[:400])


@pytest.fixture
def small_disk(tmp_path, request):
    """A 1 MiB tmpfs mounted at tmp_path/disk (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(mnt)], capture_output=True))
    return mnt


def test_disk_full_during_checkpoint_keeps_previous(small_disk, request):
    """Fault 5: the disk fills while a checkpoint is written; the previous one stays intact."""
    d = str(small_disk / "checkpoints")
    comm = _world()
    first = ckpt.save_checkpoint(d, _state(100, 60_000, 1), comm)  # ~240 KB: fits
    before = {p: _sha(os.path.join(d, p)) for p in os.listdir(d)}
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as ei:
        ckpt.save_checkpoint(d, _state(200, 400_000, 2), comm)  # ~1.6 MB: does not fit
    detect = time.perf_counter() - t0
    msg = str(ei.value)
    assert "disk full" in msg and "ckpt-00000200" in msg and "untouched" in msg, msg
    after = {p: _sha(os.path.join(d, p)) for p in os.listdir(d)}
    assert after == before, f"previous checkpoint files changed: {before} -> {after}"
    loaded = ckpt.load_latest(d, log=lambda m: None)
    assert loaded.iteration == 100 and loaded.path == first
    free = shutil.disk_usage(small_disk).free
    assert free > 500_000, f"the failed write left {(1 << 20) - free} bytes used"
    record("f5_disk_full", order=5, fault="Disk fills during a checkpoint write",
           injected="1 MiB tmpfs; a 1.6 MB checkpoint written after a 240 KB one",
           outcome="CheckpointError on every rank: 'disk full while writing checkpoint ... previous "
                   "checkpoint ... is untouched'; no partial file left; the previous checkpoint loads",
           detect_s=detect, data_lost="none (the new checkpoint was not written; training state in memory)",
           test=request.node.nodeid, evidence=msg[:400])
