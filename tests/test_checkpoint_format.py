"""Checkpoint format: per-rank state as JSON + arrays, exact round trip, old checkpoints, no code on load.

A checkpoint that would run code when loaded (a pickle whose ``__reduce__`` calls
``os.system`` or ``open``) must be refused with a CheckpointError, and the code must
not run: each crafted payload's side effect is a marker file that must not appear.
Every payload is first shown to work under plain ``pickle.loads`` (against a
separate control marker), so these tests cannot pass merely because a payload is
inert.
"""

import builtins
import io
import json
import os
import pickle
import random

import numpy as np
import pytest
from test_checkpoint import SelfComm  # the one-rank stand-in communicator

from hpcsgd.errors import CheckpointError
from hpcsgd.train import checkpoint as ckpt
from hpcsgd.train import state_codec


def same(a, b, where="state"):
    """Strict equality: same types, dtypes, shapes, memory order and bytes (NaN payloads included)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if isinstance(a, np.ndarray):
            assert a.flags.f_contiguous == b.flags.f_contiguous, where
        assert np.asarray(a).tobytes(order="A") == np.asarray(b).tobytes(order="A"), where
    elif isinstance(a, float):
        assert a.hex() == b.hex() or (a != a and b != b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def rich_state(seed):
    rng = np.random.RandomState(seed)
    random.seed(seed)
    np.random.seed(seed)
    np.random.randn(3)  # leaves a cached Gaussian in the state
    return {
        "rng": ckpt.capture_rng(),
        "loader": {"epoch": 3, "position": 17, "seed": 2**40 + 1, "shuffle": True, "note": None},
        "bn": {"b1/bn/avg_mean": rng.randn(8).astype(np.float32),
               "b1/bn/avg_var": rng.rand(8).astype(np.float64)},
        "odd": [np.float32(1.5), np.int64(-3), np.bool_(True), np.zeros((), np.float16),
                np.asfortranarray(rng.randn(3, 2)), (rng.randn(2) + 1j).astype(np.complex64),
                np.array([1, 2], np.uint8).reshape(2, 1, 1), float("nan"), float("-inf"), -0.0,
                1e-310, 10**30, "é", (), []],
        "int keys": {1: "a", (2, 3): "b"},
        "$type": "a user key that looks like a tag",
    }


def test_rank_states_round_trip_exactly(tmp_path):
    states = [rich_state(1), rich_state(2)]
    ckpt.save_checkpoint(str(tmp_path), {"iteration": 5, "arrays": {"model/w": np.ones(3, np.float32)},
                                         "meta": {"iteration": 5}, "rank_state": states}, SelfComm())
    loaded = ckpt.load_latest(str(tmp_path))
    same(loaded.rank_states, [states])
    assert set(loaded.arrays) == {"model/w"}
    with np.load(tmp_path / "ckpt-00000005.npz", allow_pickle=False) as npz:  # JSON + arrays, no pickle
        assert state_codec.JSON_KEY in npz.files and state_codec.LEGACY_KEY not in npz.files
        assert not [k for k in npz.files if npz[k].dtype.hasobject]


def test_restored_rng_continues_the_same_sequence(tmp_path):
    random.seed(11)
    np.random.seed(12)
    np.random.randn(1)
    ckpt.save_checkpoint(str(tmp_path), {"iteration": 1, "meta": {"iteration": 1},
                                         "rank_state": {"rng": ckpt.capture_rng()}}, SelfComm())
    expect = (random.random(), np.random.randn(5).tobytes(), np.random.randint(1 << 30))
    random.seed(0)
    np.random.seed(0)
    ckpt.restore_rng(ckpt.load_latest(str(tmp_path)).rank_states[0]["rng"])
    assert (random.random(), np.random.randn(5).tobytes(), np.random.randint(1 << 30)) == expect


@pytest.mark.parametrize("bad,named", [({"x": {1, 2}}, "['x']: a builtins.set"),
                                       ({"y": [object()]}, "['y'][0]: a builtins.object"),
                                       ({"z": np.array([None])}, "['z']: an array of dtype object")])
def test_unstorable_rank_state_is_refused_when_written(tmp_path, bad, named):
    ckpt.save_checkpoint(str(tmp_path), {"iteration": 1, "meta": {}, "rank_state": {}}, SelfComm())
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match="cannot be stored|Python objects") as ei:
        ckpt.save_checkpoint(str(tmp_path), {"iteration": 2, "meta": {}, "rank_state": bad}, SelfComm())
    assert named in str(ei.value), str(ei.value)
    assert sorted(os.listdir(tmp_path)) == before


# -- checkpoints written by older versions (per-rank state pickled) --------------------------------

def old_serialize(arrays, meta, rank_states):
    """checkpoint.serialize as older versions wrote it (verbatim): rank states pickled in __ranks__."""
    buf = io.BytesIO()
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    payload["__ranks__"] = np.frombuffer(pickle.dumps(rank_states, protocol=4), dtype=np.uint8)
    np.savez(buf, **payload)
    return buf.getvalue()


def write_checkpoint_bytes(directory, iteration, data):
    """Write ``data`` with a valid manifest, as anyone who can write the directory could."""
    return ckpt._write_rank0(str(directory), iteration, data, keep=3)


def test_old_format_checkpoint_still_loads(tmp_path):
    states = [{"rng": rich_state(r)["rng"], "loader": {"epoch": 0, "position": r, "seed": 0},
               "bn": rich_state(r)["bn"], "scalar": np.float32(2.5)} for r in range(2)]
    arrays = {"model/w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    write_checkpoint_bytes(tmp_path, 9, old_serialize(arrays, {"iteration": 9, "history": []}, states))
    loaded = ckpt.load_latest(str(tmp_path))
    assert loaded.iteration == 9 and set(loaded.arrays) == {"model/w"}
    same(loaded.arrays["model/w"], arrays["model/w"])
    same(loaded.rank_states, states)


class RunsCode:
    """Unpickling this calls ``func(*args)``: the classic pickle payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    return {"os.system": RunsCode(os.system, f"touch '{marker}'"),
            "builtins.open": RunsCode(builtins.open, str(marker), "w"),
            "object-array": np.array([RunsCode(builtins.open, str(marker), "w")], dtype=object)}


KINDS = list(payloads("x"))


@pytest.mark.parametrize("kind", KINDS)
def test_payloads_do_run_code_under_plain_pickle(tmp_path, kind):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps([{"rng": payloads(control)[kind]}], protocol=4))
    assert control.exists()


@pytest.mark.parametrize("load", ["load_latest", "load_for_resume"])
@pytest.mark.parametrize("kind", KINDS)
def test_old_format_checkpoint_that_would_run_code_is_refused(tmp_path, kind, load):
    marker = tmp_path / "pwned"
    d = tmp_path / "checkpoints"
    ckpt.save_checkpoint(str(d), {"iteration": 1, "meta": {"iteration": 1}, "rank_state": {}}, SelfComm())
    evil = old_serialize({"model/w": np.ones(2, np.float32)}, {"iteration": 2},
                         [{"rng": payloads(marker)[kind]}])
    path = write_checkpoint_bytes(d, 2, evil)
    with pytest.raises(CheckpointError) as ei:
        if load == "load_latest":
            ckpt.load_latest(str(d))
        else:
            ckpt.load_for_resume(str(d), SelfComm())
    msg = str(ei.value)
    assert path in msg and "refusing to load" in msg and "older hpcsgd" in msg, msg
    assert ("system" in msg) if kind == "os.system" else ("open" in msg or "Python objects" in msg), msg
    assert not marker.exists(), "loading the checkpoint ran the payload"


@pytest.mark.parametrize("kind", KINDS)
def test_object_array_in_new_format_is_refused(tmp_path, kind):
    """A crafted .npz whose model arrays (not the rank state) carry a pickle: np.load refuses it."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.savez(buf, **{"model/w": np.array([payloads(marker)[kind]], dtype=object),
                     "__meta__": np.frombuffer(b'{"iteration": 3}', np.uint8),
                     **state_codec.encode([{}])})
    path = write_checkpoint_bytes(tmp_path, 3, buf.getvalue())
    with pytest.raises(CheckpointError, match="cannot be read safely") as ei:
        ckpt.load_latest(str(tmp_path))
    assert path in str(ei.value)
    assert not marker.exists()


@pytest.mark.parametrize("tree,match", [
    ({"format": 2, "ranks": [{"$type": "pickle", "data": "gASV"}]}, "unknown entry type 'pickle'"),
    ({"format": 2, "ranks": [{"$type": "array", "key": "model/w"}]}, "missing array 'model/w'"),
    ({"format": 3, "ranks": []}, "format 3 is not 2"),
    ({"format": 2, "ranks": {}}, "is a dict, not a list"),
])
def test_malformed_rank_state_json_is_a_clear_error(tmp_path, tree, match):
    buf = io.BytesIO()
    np.savez(buf, **{"model/w": np.ones(2, np.float32), "__meta__": np.frombuffer(b"{}", np.uint8),
                     state_codec.JSON_KEY: np.frombuffer(json.dumps(tree).encode(), np.uint8)})
    write_checkpoint_bytes(tmp_path, 4, buf.getvalue())
    with pytest.raises(CheckpointError, match=match):
        ckpt.load_latest(str(tmp_path))


def test_old_format_object_array_of_plain_values_is_refused(tmp_path):
    """Only allowlisted globals, but an object-dtype array: refused (a rank state never holds one)."""
    data = old_serialize({}, {"iteration": 2}, [{"bn": np.array([1, "x"], dtype=object)}])
    write_checkpoint_bytes(tmp_path, 2, data)
    with pytest.raises(CheckpointError, match="array of Python objects; refusing to load"):
        ckpt.load_latest(str(tmp_path))
