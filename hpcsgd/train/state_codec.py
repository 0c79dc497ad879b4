"""Per-rank checkpoint state as arrays plus JSON, so loading a checkpoint cannot run code.

Why: a checkpoint is read on every rank at ``--resume``, and whoever can write
one (a shared scratch directory, a downloaded model) must not be able to make
the ranks execute code. The sha256 manifest proves integrity, not origin. So
the per-rank state (RNG states, loader position, BN running averages) is
stored as a JSON tree whose arrays are ordinary ``.npz`` members, read with
``np.load(allow_pickle=False)``: nothing on the load path unpickles.

The tree holds ``None``, ``bool``, ``int``, ``float`` (non-finite ones as
``float.hex``), ``str``, lists, tuples, dicts (string keys stay a JSON object;
other keys use an item list), NumPy arrays of any non-object dtype and NumPy
scalars. Arrays and scalars keep dtype, shape and bytes, floats round-trip
through ``repr``, so decoding gives back exactly what was encoded (resume
stays bitwise). Anything else is refused when the checkpoint is written.

Checkpoints written before this format hold the rank states as one pickle
(``__ranks__``). :func:`load_legacy_ranks` still reads them, with an
``Unpickler`` whose ``find_class`` allows only NumPy's array, dtype and scalar
reconstructors (what such a state needs: ``random.getstate()`` tuples,
``np.random.get_state()``, ints, floats, dicts); every other global (``os.system``,
``builtins.eval``, any class) is refused before it is looked up, so a crafted
pickle cannot call it. This is the scheme of PyTorch's ``weights_only=True``;
pickle opcodes still run there, but they can only build plain containers and
NumPy arrays of non-object dtype, which the result is checked for.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from typing import Any

import numpy as np

from hpcsgd.errors import CheckpointError

FORMAT = 2  # 1: pickled rank states (read by load_legacy_ranks); 2: JSON tree + arrays
JSON_KEY = "__ranks__.json"
ARRAY_PREFIX = "__ranks__/"
LEGACY_KEY = "__ranks__"

_TAG = "$type"
_ALLOWED = "None, bool, int, float, str, list, tuple, dict, NumPy arrays (no object dtype) and NumPy scalars"


# -- encoding --------------------------------------------------------------------

def encode(rank_states: list) -> dict[str, np.ndarray]:
    """``.npz`` members holding ``rank_states``: the JSON tree and one member per array.

    Raises CheckpointError naming the path of the first value that cannot be stored.
    """
    arrays: dict[str, np.ndarray] = {}
    tree = {"format": FORMAT, "ranks": _enc(rank_states, arrays, "rank_states")}
    text = json.dumps(tree, allow_nan=False, separators=(",", ":"))
    arrays[JSON_KEY] = np.frombuffer(text.encode(), dtype=np.uint8)
    return arrays


def _array_ref(kind: str, value: np.ndarray, arrays: dict, where: str) -> dict:
    if value.dtype.hasobject:
        raise CheckpointError(f"{where}: an array of dtype {value.dtype} holds Python objects; "
                              f"a checkpoint stores {_ALLOWED}")
    key = f"{ARRAY_PREFIX}{len(arrays)}"
    arrays[key] = value
    return {_TAG: kind, "key": key}


def _enc(obj: Any, arrays: dict, where: str) -> Any:
    if obj is None or type(obj) in (bool, str):
        return obj
    if type(obj) is int:
        return obj
    if type(obj) is float:
        return obj if math.isfinite(obj) else {_TAG: "float", "hex": obj.hex()}
    if isinstance(obj, np.generic):
        return _array_ref("scalar", np.asarray(obj), arrays, where)
    if hasattr(obj, "__cuda_array_interface__") and hasattr(obj, "get"):
        obj = obj.get()  # CuPy array: stored (and restored) as its host copy
    if isinstance(obj, np.ndarray):
        return _array_ref("array", obj, arrays, where)
    if isinstance(obj, tuple):
        return {_TAG: "tuple", "items": [_enc(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_enc(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(type(k) is str for k in obj) and _TAG not in obj:
            return {k: _enc(v, arrays, f"{where}[{k!r}]") for k, v in obj.items()}
        return {_TAG: "dict", "items": [[_enc(k, arrays, f"{where} key {k!r}"),
                                         _enc(v, arrays, f"{where}[{k!r}]")] for k, v in obj.items()]}
    raise CheckpointError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored "
                          f"in a checkpoint; per-rank state may hold {_ALLOWED}")


# -- decoding --------------------------------------------------------------------

def decode(path: str, members: dict[str, np.ndarray]) -> list:
    """The rank states stored by :func:`encode` (members already read without pickle)."""
    try:
        tree = json.loads(members[JSON_KEY].tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its per-rank state ({JSON_KEY}) is not valid JSON: "
                              f"{e}") from e
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        got = tree.get("format") if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"checkpoint {path}: per-rank state format {got!r} is not {FORMAT} "
                              f"(written by a newer hpcsgd?)")
    ranks = _dec(tree.get("ranks"), members, path)
    if not isinstance(ranks, list):
        raise CheckpointError(f"checkpoint {path}: per-rank state is a {type(ranks).__name__}, not a list")
    return ranks


def _member(node: dict, members: dict, path: str) -> np.ndarray:
    key = node.get("key")
    if not isinstance(key, str) or not key.startswith(ARRAY_PREFIX) or key not in members:
        raise CheckpointError(f"checkpoint {path}: per-rank state refers to a missing array {key!r}")
    return members[key]


def _dec(node: Any, members: dict, path: str) -> Any:
    if isinstance(node, list):
        return [_dec(v, members, path) for v in node]
    if not isinstance(node, dict):
        return node
    if _TAG not in node:
        return {k: _dec(v, members, path) for k, v in node.items()}
    kind = node[_TAG]
    if kind == "array":
        return _member(node, members, path)
    if kind == "scalar":
        return _member(node, members, path)[()]
    if kind == "tuple":
        return tuple(_dec(v, members, path) for v in node.get("items", []))
    if kind == "dict":
        return {_dec(k, members, path): _dec(v, members, path) for k, v in node.get("items", [])}
    if kind == "float":
        return float.fromhex(node["hex"])
    raise CheckpointError(f"checkpoint {path}: unknown entry type {kind!r} in the per-rank state")


# -- checkpoints written before FORMAT 2 -------------------------------------------

# The globals a pickled rank state of format 1 needs: NumPy arrays (uint32 MT19937 keys,
# BN averages), their dtypes, and NumPy scalars. numpy 2 moved numpy.core to numpy._core.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _AllowlistUnpickler(pickle.Unpickler):
    """Resolves only :data:`_SAFE_GLOBALS`; anything else is refused before it is imported."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name}")
        import importlib

        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id")


def _check_plain(obj: Any, path: str) -> None:
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.hasobject or (isinstance(obj, np.ndarray) and type(obj) is not np.ndarray):
            raise CheckpointError(f"checkpoint {path}: its old-format per-rank state holds an array of "
                                  f"Python objects; refusing to load it")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, path)
            _check_plain(v, path)


def load_legacy_ranks(path: str, blob: bytes) -> list:
    """Rank states of a format-1 checkpoint, read with the allowlisting unpickler."""
    try:
        ranks = _AllowlistUnpickler(io.BytesIO(blob)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} was written by an older hpcsgd and its per-rank state (a pickle) refers "
            f"to {e}, which a checkpoint may not: refusing to load it, nothing of it was run. An old "
            f"checkpoint can hold only {_ALLOWED}") from e
    except Exception as e:  # noqa: BLE001 - any malformed pickle is a bad checkpoint
        raise CheckpointError(f"checkpoint {path}: its old-format per-rank state cannot be read: "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(ranks, list):
        raise CheckpointError(f"checkpoint {path}: old-format per-rank state is a {type(ranks).__name__}, "
                              f"not a list")
    _check_plain(ranks, path)
    return ranks
