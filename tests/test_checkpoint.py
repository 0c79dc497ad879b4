"""Checkpoint files: atomic write, sha256, keep-last-K, checksum fallback, disk full (one process).

The collective parts (replica check across ranks, bitwise resume) run under
mpiexec in tests/test_train.py.
"""

import errno
import hashlib
import json
import os

import numpy as np
import pytest

from hpcsgd.errors import CheckpointError
from hpcsgd.train import checkpoint as ckpt


class SelfComm:
    """A one-rank stand-in for an mpi4py communicator (gather/bcast/allgather are identity)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def gather(self, obj, root=0):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]


def state(it, value=1.0):
    return {"iteration": it, "arrays": {"model/w": np.full((3, 4), value, np.float32)},
            "meta": {"iteration": it, "note": "x"}, "rank_state": {"rng": ckpt.capture_rng()}}


def test_roundtrip_and_manifest(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), state(7, 2.5), SelfComm())
    assert os.path.basename(path) == "ckpt-00000007.npz"
    manifest = json.loads((tmp_path / "ckpt-00000007.json").read_text())
    data = (tmp_path / "ckpt-00000007.npz").read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["bytes"] == len(data)
    loaded = ckpt.load_latest(str(tmp_path))
    assert loaded.iteration == 7 and loaded.meta["note"] == "x"
    np.testing.assert_array_equal(loaded.arrays["model/w"], np.full((3, 4), 2.5, np.float32))
    assert set(loaded.rank_states[0]["rng"]) == {"python", "numpy"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_keeps_last_k(tmp_path):
    for it in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(str(tmp_path), state(it), SelfComm(), keep=2)
    assert [i for i, _ in ckpt.list_checkpoints(str(tmp_path))] == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000004.json", "ckpt-00000004.npz",
                                            "ckpt-00000005.json", "ckpt-00000005.npz"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_bad_checksum_falls_back_to_previous(tmp_path, damage):
    ckpt.save_checkpoint(str(tmp_path), state(1, 1.0), SelfComm())
    ckpt.save_checkpoint(str(tmp_path), state(2, 2.0), SelfComm())
    newest = tmp_path / "ckpt-00000002.npz"
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(bytes(data[:100]))
    else:
        newest.unlink()
    said = []
    loaded = ckpt.load_latest(str(tmp_path), log=said.append)
    assert loaded.iteration == 1
    np.testing.assert_array_equal(loaded.arrays["model/w"], np.full((3, 4), 1.0, np.float32))
    assert len(said) == 1 and "ckpt-00000002.npz" in said[0] and "falling back" in said[0], said
    if damage != "delete":
        assert "checksum" in said[0]


def test_no_checkpoint_returns_none(tmp_path):
    assert ckpt.load_latest(str(tmp_path / "nothing")) is None


def test_disk_full_leaves_previous_untouched(tmp_path, monkeypatch):
    ckpt.save_checkpoint(str(tmp_path), state(1, 1.0), SelfComm())
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError) as ei:
        ckpt.save_checkpoint(str(tmp_path), state(2, 2.0), SelfComm())
    monkeypatch.setattr(os, "fsync", real_fsync)
    msg = str(ei.value)
    assert "disk full" in msg and "ckpt-00000002.npz" in msg and "ckpt-00000001 is untouched" in msg, msg
    after = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    assert after == before  # no tmp file left, previous checkpoint byte-identical
    assert ckpt.load_latest(str(tmp_path)).iteration == 1


def test_chainer_objects_roundtrip():
    import chainer
    import chainer.links as L

    np.random.seed(0)
    a, b = L.Linear(3, 2), L.Linear(3, 2)
    opt_a, opt_b = chainer.optimizers.MomentumSGD(lr=0.1), chainer.optimizers.MomentumSGD(lr=0.1)
    opt_a.setup(a)
    opt_b.setup(b)
    a.W.grad = np.ones_like(a.W.array)
    a.b.grad = np.ones_like(a.b.array)
    opt_a.update()
    arrays = {**ckpt.to_arrays("model", a), **ckpt.to_arrays("optimizer", opt_a)}
    ckpt.from_arrays("model", b, arrays)
    ckpt.from_arrays("optimizer", opt_b, arrays)
    np.testing.assert_array_equal(a.W.array, b.W.array)
    va, vb = opt_a.target.W.update_rule.state["v"], opt_b.target.W.update_rule.state["v"]
    np.testing.assert_array_equal(va, vb)
    assert opt_b.t == 1


def test_replica_digest_detects_a_one_bit_change():
    import chainer.links as L

    m = L.Linear(3, 2)
    d0 = ckpt.parameter_digests(m)
    m.W.array.view(np.uint32)[0, 0] ^= 1
    d1 = ckpt.parameter_digests(m)
    assert [n for (n, x), (_, y) in zip(d0, d1) if x != y] == ["/W"]
