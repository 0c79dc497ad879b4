"""Batched gradient packing: every gradient of a link in one flat layout.

:class:`GradLayout` (the only flat layout in hpcsgd) fixes where each parameter's
gradient lives in the flat buffer (element offsets, in an order the caller gives:
sorted parameter names as ChainerMN, or backward order for overlap) and cuts the
flat range into buckets of ``bucket_bytes`` of wire data. A bucket may split a
large parameter; :meth:`GradLayout.pieces` maps a flat range back to
``(param index, flat lo, flat hi)`` pieces.

:class:`BoundGrads` holds this call's gradients as 1-D views (one per layout
slot) and packs/unpacks any flat range with the fused kernels of
:mod:`hpcsgd.comm.wire_kernels`: ``pack`` scales by ``1/size`` and casts in one pass,
``unpack`` casts back and counts non-finite values in the same pass.

:data:`LOCAL_SQ_NORM` (for the gradient noise scale, :mod:`hpcsgd.train.noise_scale`):
while a consumer is subscribed, :class:`~hpcsgd.comm.reducer.GradReducer` sums the
float64 squares of each bucket's *local* gradient values (:meth:`BoundGrads.sq_norm`)
on the bucket's own pass, right before its algorithm packs it (so before any
division by the world size or 16-bit cast, whatever the algorithm), and publishes
the step's total when the reduction is waited for.

Why pack at all instead of keeping gradients as views of the flat buffer?
Chainer 7.8.1 never writes a gradient in place: backward computes each
parameter's gradient as a new array and *replaces* ``param.grad`` with it
(``_backprop._backprop_to_all`` -> ``Variable._set_grad_var_without_check``);
when a gradient already exists (after ``zerograds()`` or when accumulating)
it is summed with ``chainer.functions.add``, again into a new array. A view
installed before backward is therefore gone after it (``tests/test_packing.py``
checks this), so the fused single-pass pack per bucket is the path; it runs on
cache-sized buckets right before they are reduced.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from dataclasses import dataclass

import numpy as np
from numba import njit

from hpcsgd.comm import wire_kernels
from hpcsgd.kernels._numba import FASTMATH


@dataclass(frozen=True)
class Slot:
    """One parameter's place in the flat buffer (offsets and sizes in elements)."""

    name: str
    shape: tuple
    dtype: str
    offset: int
    size: int


class GradLayout:
    """The one flat layout of a parameter list's gradients, in the order given.

    The blocking and double-buffered reductions use sorted-name order (ChainerMN's);
    the overlapped one uses the order in which backward finalises the gradients.
    ``gpu``: the gradients are CuPy arrays (the algorithm then works on the device).
    """

    def __init__(self, slots: list[Slot], gpu: bool = False):
        self.slots = tuple(slots)
        self.gpu = bool(gpu)
        self.total = slots[-1].offset + slots[-1].size if slots else 0
        self._starts = [s.offset for s in self.slots]
        self.key = (tuple((s.name, s.shape, s.dtype) for s in self.slots), self.gpu)
        self.index = {s.name: k for k, s in enumerate(self.slots)}

    @classmethod
    def from_named(cls, named_params) -> GradLayout:
        """Layout of ``[(name, param), ...]`` in that order (parameters with data)."""
        slots, off, gpu = [], 0, False
        for name, p in named_params:
            n = int(p.array.size)
            slots.append(Slot(name, tuple(p.array.shape), np.dtype(p.array.dtype).name, off, n))
            gpu = gpu or type(p.array).__module__.startswith("cupy")
            off += n
        return cls(slots, gpu)

    def __len__(self) -> int:
        return len(self.slots)

    def bucket_ranges(self, bucket_bytes: int, itemsize: int) -> list[tuple[int, int]]:
        """Cut ``[0, total)`` into ranges of at most ``bucket_bytes`` of wire data (elements)."""
        step = max(1, int(bucket_bytes) // itemsize)
        return [(lo, min(lo + step, self.total)) for lo in range(0, self.total, step)]

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(slot index, flat lo, flat hi)`` for each parameter overlapping ``[lo, hi)``."""
        out = []
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        while i < len(self.slots) and self.slots[i].offset < hi:
            s = self.slots[i]
            a, b = max(lo, s.offset), min(hi, s.offset + s.size)
            if a < b:
                out.append((i, a, b))
            i += 1
        return out


def select_params(model, zero_fill: bool) -> list:
    """``[(name, param)]`` that take part in a gradient mean, sorted by name (ChainerMN rules).

    Parameters without data are skipped. ``zero_fill=True``: a parameter with
    ``grad is None`` gets a zero gradient and joins; ``False``: it is skipped.
    """
    out = []
    for name, p in sorted(model.namedparams()):
        if p.array is None:  # uninitialised (lazy) parameter: no data, no gradient
            continue
        if p.grad is None:
            if not zero_fill:
                continue
            p.grad = p.xp.zeros_like(p.array)
        out.append((name, p))
    return out


def flat_view(param) -> np.ndarray:
    """``param.grad`` as a 1-D view; a non-contiguous grad is first replaced by a contiguous copy."""
    g = param.grad
    if not g.flags.c_contiguous:  # ``copy(order="C")``: the same call for NumPy and CuPy arrays
        param.grad = g = g.copy(order="C")
    return g.reshape(-1)


class BoundGrads:
    """This call's gradients (1-D views, aligned with a layout) with fused pack/unpack of flat ranges.

    ``params=None`` leaves every slot empty (``vectors[k] = None``) for the caller to fill
    slot by slot (the overlapped reduction fills them as backward finalises them).
    """

    def __init__(self, layout: GradLayout, params: list | None = None):
        self.layout = layout
        self.vectors = [None] * len(layout) if params is None else [flat_view(p) for _, p in params]

    def piece(self, i: int, a: int, b: int) -> np.ndarray:
        """Elements ``[a, b)`` (flat coordinates) of slot ``i``'s gradient."""
        off = self.layout.slots[i].offset
        return self.vectors[i][a - off:b - off]

    def pack(self, lo: int, hi: int, dst: np.ndarray, scale: float, wire: str) -> None:
        """``dst[k] = wire(flat[lo + k] * scale)`` for ``k < hi - lo``."""
        for i, a, b in self.layout.pieces(lo, hi):
            wire_kernels.pack_into(self.piece(i, a, b), dst[a - lo:b - lo], scale, wire)

    def sq_norm(self, lo: int, hi: int) -> float:
        """sum_k flat[lo + k]^2 for ``k < hi - lo`` in float64: the local values, as they are now.

        Why here: the reduction engine calls it per bucket right before the bucket's
        algorithm reads the same (cache-hot) elements to pack them; CuPy pieces are
        reduced on the device with one synchronization per call.
        """
        total, device = 0.0, None
        for i, a, b in self.layout.pieces(lo, hi):
            v = self.piece(i, a, b)
            if isinstance(v, np.ndarray) and v.dtype in (np.float32, np.float64):
                total += float(_sum_sq(v))
            elif isinstance(v, np.ndarray):  # float16 parameters: numba has no half type
                w = v.astype(np.float64)
                total += float(w @ w)
            else:
                part = (v.astype("float64") ** 2).sum()
                device = part if device is None else device + part
        return total + (float(device) if device is not None else 0.0)

    def unpack(self, lo: int, hi: int, src: np.ndarray, scale: float, wire: str) -> int:
        """``flat[lo + k] = float(src[k]) * scale``; returns the number of non-finite results."""
        bad = 0
        for i, a, b in self.layout.pieces(lo, hi):
            bad += wire_kernels.unpack_from(src[a - lo:b - lo], self.piece(i, a, b), scale, wire)
        return bad


def pack_all(layout: GradLayout, params: list, buffer: np.ndarray, scale: float = 1.0,
             wire: str = "float32") -> None:
    """Pack every gradient into ``buffer`` (wire storage, ``layout.total`` elements)."""
    BoundGrads(layout, params).pack(0, layout.total, buffer, scale, wire)


def unpack_all(layout: GradLayout, params: list, buffer: np.ndarray, scale: float = 1.0,
               wire: str = "float32") -> int:
    """Unpack ``buffer`` into every gradient; returns the non-finite count."""
    return BoundGrads(layout, params).unpack(0, layout.total, buffer, scale, wire)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _sum_sq(a):  # serial: it runs on the reduction's worker thread, next to the serial pack kernels
    s = 0.0
    for i in range(a.size):
        v = np.float64(a[i])
        s += v * v
    return s


class LocalSqNorm:
    """The last completed reduction's local squared gradient norm, |g_local|^2 (float64, unscaled).

    Why process-wide rather than a communicator attribute: double buffering and overlap
    reduce on private clones of the training communicator, so the engine that sees the
    local gradient is not the object the training loop holds. One process is one rank,
    and one gradient reduction completes per optimizer step.

    A consumer :meth:`subscribe`\\ s (held weakly: measuring stops once every consumer is
    gone); engines then measure each step (:meth:`armed`) and :meth:`publish` its total
    at ``wait()``; a consumer :meth:`read`\\ s ``(value, serial)`` and compares the serial
    with the last one it used, so a step without a completed reduction reads as nothing.
    Units: (gradient units)^2, summed over every reduced element of this rank.
    """

    def __init__(self) -> None:
        self._consumers: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._value, self._serial = float("nan"), 0

    def subscribe(self, consumer) -> int:
        """Start measuring for ``consumer`` (weakly held); returns the current serial."""
        with self._lock:
            self._consumers.add(consumer)
            return self._serial

    def armed(self) -> bool:
        """True while any consumer is subscribed: engines measure the next step."""
        return len(self._consumers) > 0

    def publish(self, value: float) -> None:
        with self._lock:
            self._value, self._serial = float(value), self._serial + 1

    def read(self) -> tuple[float, int]:
        """(last published |g_local|^2, its serial); serial 0: nothing published yet."""
        with self._lock:
            return self._value, self._serial


#: The process's pack-pass local squared norm (see :class:`LocalSqNorm`).
LOCAL_SQ_NORM = LocalSqNorm()
