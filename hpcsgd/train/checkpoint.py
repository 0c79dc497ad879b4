"""Checkpoints: replica check, atomic write with sha256, keep-last-K, resume with fallback.

Layout of a checkpoint directory (``OUT/checkpoints``)::

    ckpt-00000120.npz    model/<param>, optimizer/<state>, __meta__ (JSON),
                         __ranks__.json + __ranks__/<k> (per-rank state: JSON tree + arrays)
    ckpt-00000120.json   manifest: file, bytes, sha256, iteration, written_at

Nothing on the load path unpickles: the ``.npz`` is read with
``allow_pickle=False`` and the per-rank state is JSON plus plain arrays
(:mod:`hpcsgd.train.state_codec`), so a checkpoint from an untrusted place
cannot run code. Checkpoints of older versions (per-rank state pickled in
``__ranks__``) are read with an allowlisting unpickler that refuses every
global but NumPy's array reconstructors.

Writing (:func:`save_checkpoint`, collective):

1. every rank computes a CRC32 digest of its parameters; one ``Allgather`` of
   those 4-byte digests proves all replicas are identical (else
   :class:`ParameterMismatchError` naming the first differing parameter);
2. per-rank state (RNG states, loader position) is gathered to rank 0;
3. rank 0 serialises to memory, hashes it (sha256), writes ``.npz.tmp``,
   fsyncs, renames, fsyncs the directory, then writes the manifest the same
   way. A checkpoint exists only once its manifest does, so a crash or a full
   disk never leaves a half-written checkpoint that looks good, and the
   previous checkpoints are never touched before the new one is complete;
4. older checkpoints beyond ``keep`` are deleted;
5. rank 0 broadcasts success or the error, so every rank raises the same
   :class:`CheckpointError`.

Reading (:func:`load_latest`): newest manifest first; a missing file or a
checksum mismatch is reported and the previous good checkpoint is used.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hpcsgd.errors import CheckpointError, ParameterMismatchError
from hpcsgd.runtime.watchdog import collective
from hpcsgd.train import state_codec

_NAME = re.compile(r"^ckpt-(\d{8,})\.json$")


def _mpi(comm):
    """The mpi4py communicator behind an hpcsgd/ChainerMN communicator (or ``comm`` itself)."""
    return getattr(comm, "mpi_comm", comm)


# -- replica check -------------------------------------------------------------

def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def parameter_digests(model) -> list[tuple[str, int]]:
    """(name, CRC32 of the bytes) for every parameter, in sorted name order."""
    out = []
    for name, p in sorted(model.namedparams()):
        data = b"" if p.array is None else np.ascontiguousarray(_host(p.array)).tobytes()
        out.append((name, zlib.crc32(data)))
    return out


def verify_replicas(model, comm) -> None:
    """Raise ParameterMismatchError on every rank unless all ranks hold bitwise-equal parameters.

    Cost: one CRC32 pass over the parameters and one Allgather of 4 bytes per rank.
    """
    mpi = _mpi(comm)
    digests = parameter_digests(model)
    total = 0
    for _, crc in digests:
        total = zlib.crc32(crc.to_bytes(4, "little"), total)
    with collective("allgather", what="parameter checksum"):
        all_totals = mpi.allgather(total)
    if len(set(all_totals)) == 1:
        return
    with collective("allgather", what="per-parameter checksums"):
        all_digests = mpi.allgather(digests)
    for i, (name, _) in enumerate(digests):
        values = [d[i][1] if i < len(d) else None for d in all_digests]
        if len(set(values)) > 1:
            bad = [r for r, v in enumerate(values) if v != values[0]]
            raise ParameterMismatchError(
                f"replicas diverged: parameter {name!r} differs from rank 0 on ranks {bad}; "
                f"refusing to checkpoint")
    raise ParameterMismatchError("replicas diverged: parameter sets differ between ranks")


# -- writing ---------------------------------------------------------------------

def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    """tmp file, fsync, rename, fsync dir. The tmp file is removed on failure."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(iteration, manifest path) of every complete checkpoint, oldest first."""
    out = []
    for path in glob.glob(os.path.join(directory, "ckpt-*.json")):
        m = _NAME.match(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def serialize(arrays: dict[str, np.ndarray], meta: dict, rank_states: list) -> bytes:
    """The ``.npz`` bytes; raises CheckpointError if a rank state holds a type JSON + arrays cannot."""
    reserved = [k for k in arrays if k.startswith("__")]
    if reserved:
        raise CheckpointError(f"checkpoint array names may not start with '__' (reserved): {reserved[:3]}")
    buf = io.BytesIO()
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    payload.update(state_codec.encode(rank_states))
    np.savez(buf, **payload)
    return buf.getvalue()


def _write_rank0(directory: str, iteration: int, data: bytes, keep: int) -> str:
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"ckpt-{iteration:08d}")
    previous = list_checkpoints(directory)
    prev_text = (f"previous checkpoint {os.path.basename(previous[-1][1])[:-5]} is untouched"
                 if previous else "there is no previous checkpoint")
    try:
        _atomic_write(stem + ".npz", data)
        manifest = {"file": os.path.basename(stem) + ".npz", "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "iteration": iteration,
                    "written_at": time.time()}
        _atomic_write(stem + ".json", json.dumps(manifest, indent=1).encode())
    except OSError as e:
        for leftover in (stem + ".npz",):
            if not os.path.exists(stem + ".json") and os.path.exists(leftover):
                os.unlink(leftover)
        what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "I/O error"
        raise CheckpointError(
            f"{what} while writing checkpoint {stem}.npz ({len(data)} bytes): {e.strerror or e}; "
            f"{prev_text}") from e
    for _, old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        for p in (old[:-5] + ".npz", old):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return stem + ".npz"


def save_checkpoint(directory: str, state: dict, comm, keep: int = 3) -> str:
    """Write a checkpoint (collective over ``comm``); returns the .npz path on every rank.

    ``state`` keys: ``iteration`` (int), ``arrays`` (name -> array, identical on all
    ranks, taken from rank 0), ``meta`` (JSON-able, from rank 0), ``rank_state``
    (gathered from every rank: None, bool, int, float, str, lists, tuples, dicts,
    NumPy arrays and scalars; see :mod:`hpcsgd.train.state_codec`), ``model``
    (optional: the replica check runs on it).
    """
    mpi = _mpi(comm)
    if state.get("model") is not None:
        verify_replicas(state["model"], comm)
    with collective("gather", what="checkpoint rank state"):
        rank_states = mpi.gather(state.get("rank_state"), root=0)
    result: tuple[str, str | None]
    if mpi.Get_rank() == 0:
        try:
            data = serialize(state.get("arrays", {}), state.get("meta", {}), rank_states)
            result = ("ok", _write_rank0(directory, int(state["iteration"]), data, keep))
        except CheckpointError as e:
            result = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - reported identically on every rank
            result = ("error", f"writing checkpoint in {directory} failed: {type(e).__name__}: {e}")
    else:
        result = ("", None)
    with collective("bcast", what="checkpoint result"):
        status, text = mpi.bcast(result, root=0)
    if status != "ok":
        raise CheckpointError(text)
    return text


# -- reading ---------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: str
    iteration: int
    meta: dict
    arrays: dict[str, np.ndarray]
    rank_states: list = field(default_factory=list)


def deserialize(path: str, data: bytes) -> Checkpoint:
    """Parse checkpoint bytes without unpickling anything (old format: see state_codec)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (ValueError, KeyError, OSError, EOFError) as e:  # ValueError too: "Object arrays cannot..."
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {type(e).__name__}: {e}") from e
    if state_codec.JSON_KEY in arrays:
        rank_states = state_codec.decode(path, arrays)
    elif state_codec.LEGACY_KEY in arrays:
        rank_states = state_codec.load_legacy_ranks(path, arrays[state_codec.LEGACY_KEY].tobytes())
    else:
        rank_states = []
    arrays = {k: v for k, v in arrays.items() if not k.startswith("__")}
    return Checkpoint(path, int(meta.get("iteration", -1)), meta, arrays, rank_states)


def _read_verified(manifest_path: str) -> tuple[str, bytes]:
    """Return (npz path, bytes) or raise CheckpointError saying what is wrong."""
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {e}") from e
    path = os.path.join(os.path.dirname(manifest_path), manifest.get("file", ""))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} is missing or unreadable: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.get("sha256") or len(data) != manifest.get("bytes"):
        raise CheckpointError(
            f"checkpoint {path} failed its checksum (sha256 {digest[:12]}.. over {len(data)} bytes, "
            f"manifest says {str(manifest.get('sha256'))[:12]}.. over {manifest.get('bytes')} bytes)")
    return path, data


def find_latest(directory: str, log: Callable[[str], Any] = print) -> tuple[str, bytes] | None:
    """Newest checkpoint in ``directory`` that passes its checksum, as (path, bytes), else None.

    Each bad one is reported through ``log`` before falling back to the previous one.
    """
    for _, manifest in reversed(list_checkpoints(directory)):
        try:
            return _read_verified(manifest)
        except CheckpointError as e:
            log(f"[hpcsgd] {e}; falling back to the previous checkpoint")
    return None


def load_latest(directory: str, log: Callable[[str], Any] = print) -> Checkpoint | None:
    """Load the newest good checkpoint in ``directory`` on this process (no MPI)."""
    found = find_latest(directory, log)
    return None if found is None else deserialize(*found)


def load_for_resume(directory: str, comm, log: Callable[[str], Any] = print) -> Checkpoint | None:
    """Collective: rank 0 picks and verifies the checkpoint, then broadcasts its bytes.

    Ranks need no shared file system. Returns None on every rank when there is none.
    """
    mpi = _mpi(comm)
    found = find_latest(directory, log) if mpi.Get_rank() == 0 else None
    with collective("bcast", what="checkpoint bytes"):
        found = mpi.bcast(found, root=0)
    return None if found is None else deserialize(*found)


# -- Chainer objects <-> arrays ---------------------------------------------------

def to_arrays(prefix: str, obj) -> dict[str, np.ndarray]:
    """Serialise a Chainer link or optimizer into ``{prefix/name: array}``."""
    from chainer.serializers import DictionarySerializer

    target: dict = {}
    obj.serialize(DictionarySerializer(target, path=prefix + "/"))
    return {k: np.asarray(_host(v)) for k, v in target.items()}


def from_arrays(prefix: str, obj, arrays: dict[str, np.ndarray]) -> None:
    """Load what :func:`to_arrays` wrote back into ``obj`` (strict: every entry must exist)."""
    from chainer.serializers import NpzDeserializer

    obj.serialize(NpzDeserializer(arrays, path=prefix + "/", strict=True))


# -- RNG states -------------------------------------------------------------------

def capture_rng() -> dict:
    """Python's and NumPy's (global) random states of this process.

    CuPy generator states are not serialisable; on GPU the loop reseeds CuPy from
    (seed, rank, iteration) instead, which is equally reproducible.
    """
    import random

    return {"python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: dict) -> None:
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# -- per-rank BatchNorm statistics -------------------------------------------------

def rank_local_bn_stats(model) -> dict[str, np.ndarray]:
    """Running BN averages of ``bn_mode='running'`` layers, which differ by rank.

    Every rank's running averages follow its own batches until evaluation
    averages them; a resume must give each rank back its own, or the
    statistics after the resume differ from an uninterrupted run. Cost: two
    floats per BN channel per rank (ResNet-50: ~210 KB per rank, gathered to
    rank 0). Other modes need nothing: 'batch' and 'recompute' statistics are
    rebuilt before evaluation, 'sync' averages are identical on every rank.
    """
    out = {}
    for path, link in sorted(model.namedlinks()):
        if getattr(link, "mode", None) == "running" and hasattr(link, "avg_mean"):
            out[path + "/avg_mean"] = np.array(_host(link.avg_mean))
            out[path + "/avg_var"] = np.array(_host(link.avg_var))
    return out


def restore_bn_stats(model, stats: dict[str, np.ndarray]) -> None:
    links = dict(model.namedlinks())
    for key, value in stats.items():
        path, name = key.rsplit("/", 1)
        link = links[path]
        xp = getattr(link, "xp", np)
        setattr(link, name, xp.asarray(value))
