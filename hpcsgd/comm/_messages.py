"""Message headers and buffer helpers for the array collectives of MpiCommunicatorBase.

Every array operation first exchanges a small pickled :class:`Header` (shapes,
dtype, host or device, or the error the sender hit), then moves the raw bytes.
Raw bytes (``MPI.BYTE``) carry every dtype, float16 and bool included, without
conversion. Only reductions need a typed MPI datatype (:data:`MPI_SUM_TYPES`).

CuPy arrays are staged through host memory in these generic collectives, so
they work with any MPI (CUDA-aware or not); the gradient hot path in the
algorithm modules uses NCCL instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: dtypes ``allreduce`` sums natively; float16 is summed as float32.
SUM_DTYPES = ("int32", "int64", "float32", "float64")


def is_cupy(x) -> bool:
    """True for a CuPy ndarray (without importing CuPy when it is absent)."""
    mod = type(x).__module__
    return mod.startswith("cupy") and hasattr(x, "__cuda_array_interface__")


def is_array(x) -> bool:
    return isinstance(x, np.ndarray) or is_cupy(x)


def to_host(x) -> np.ndarray:
    """A C-contiguous NumPy view or copy of ``x`` (CuPy arrays are copied to the host)."""
    if is_cupy(x):
        return x.get()
    return np.ascontiguousarray(x)


def from_host(x: np.ndarray, on_device: bool):
    """``x`` itself, or a CuPy copy on the current device when ``on_device``."""
    if not on_device:
        return x
    import cupy

    return cupy.asarray(x)


@dataclass
class Header:
    """What a receiver needs to allocate: one shape per array, the dtype, host/device.

    ``error`` carries a sender-side validation error so the receivers raise it too.
    """

    shapes: list = field(default_factory=list)
    dtype: str = "float32"
    on_device: bool = False
    is_tuple: bool = False
    error: str | None = None
    error_kind: str = "TypeError"  # or "ValueError"

    def raise_error(self) -> None:
        """Raise this header's error, if it carries one."""
        if self.error:
            raise (ValueError if self.error_kind == "ValueError" else TypeError)(self.error)

    @property
    def nbytes(self) -> list[int]:
        item = np.dtype(self.dtype).itemsize
        return [int(np.prod(s, dtype=np.int64)) * item for s in self.shapes]


def describe(data, op: str, allow_tuple: bool = True) -> Header:
    """Header for an array or tuple/list of arrays; problems go into ``error`` (never raise)."""
    if is_array(data):
        arrays, is_tuple = [data], False
    elif isinstance(data, (tuple, list)) and allow_tuple:
        arrays, is_tuple = list(data), True
        if not all(is_array(a) for a in arrays):
            return Header(error=f"{op}: every element must be a numpy or cupy array")
    elif isinstance(data, (tuple, list)):
        return Header(error=f"{op}: tuple data is not supported (pass one array)")
    else:
        return Header(error=f"{op}: expected a numpy/cupy array, got {type(data).__name__}")
    if not arrays:
        return Header(shapes=[], is_tuple=True)
    dtypes = {a.dtype.str for a in arrays}
    if len(dtypes) != 1:
        return Header(error=f"{op}: all arrays must have the same dtype, got {sorted(dtypes)}")
    devices = {is_cupy(a) for a in arrays}
    if len(devices) != 1:
        return Header(error=f"{op}: arrays must be all numpy or all cupy")
    return Header(shapes=[tuple(a.shape) for a in arrays], dtype=np.dtype(arrays[0].dtype).str,
                  on_device=devices.pop(), is_tuple=is_tuple)


def raise_first_error(headers, op: str) -> None:
    """Raise (identically on every rank that sees ``headers``) the first sender error,
    or a TypeError when the ranks disagree on the dtype."""
    for r, h in enumerate(headers):
        if h is not None and h.error:
            Header(error=f"{h.error} (on rank {r})", error_kind=h.error_kind).raise_error()
    dtypes = {np.dtype(h.dtype).name for h in headers if h.shapes}
    if len(dtypes) > 1:
        per_rank = {r: np.dtype(h.dtype).name for r, h in enumerate(headers) if h.shapes}
        raise TypeError(f"{op}: ranks disagree on dtype: {per_rank}")


def displacements(counts) -> list[int]:
    """Exclusive prefix sum: offsets of consecutive blocks of ``counts`` bytes."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += int(c)
    return out


def split_flat(flat: np.ndarray, shapes, dtype) -> list[np.ndarray]:
    """Cut a flat byte buffer into arrays of ``shapes`` with ``dtype`` (views)."""
    dt = np.dtype(dtype)
    out, off = [], 0
    for s in shapes:
        n = int(np.prod(s, dtype=np.int64)) * dt.itemsize
        out.append(flat[off:off + n].view(dt).reshape(s))
        off += n
    return out
