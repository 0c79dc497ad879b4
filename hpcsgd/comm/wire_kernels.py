"""Wire-format kernels of the communicators: cast, pack, unpack and sum gradients (not training compute).

Not to be confused with :mod:`hpcsgd.kernels` (convolution, BN, ... for training). Fused
one pass per array, on CPU (numba).

Wire formats (``WIRE_FORMATS``): ``float32``, ``float16`` and ``bfloat16``. A
16-bit wire buffer is stored as ``uint16`` bits (NumPy has no bfloat16, and the
kernels work on bits anyway); :func:`wire_storage_dtype` gives the storage dtype.

CPU kernels (numba, ``nogil`` so a worker thread can overlap them with Python):

* :func:`pack_into` ``dst = wire(src * scale)``: scale and cast in one pass. The
  float16 wire passes a power-of-two scale chosen per chunk from the chunk's largest
  magnitude (:func:`half_exponent`, :func:`absmax`), so that nothing overflows and
  small values keep their bits; see :mod:`hpcsgd.comm.fp16_reduce`.
* :func:`unpack_from` ``dst = float32(src) * scale`` and returns the number of
  non-finite results: the divergence check rides along for free.
* :func:`sum_rows_to_wire`: float32 accumulation of ``k`` 16-bit rows, rounded
  once to the wire format (the bfloat16 and pre-divided float16 reductions);
  :func:`sum_scaled_rows`: the same for scaled float16 chunks, each row carrying
  its power-of-two exponent.
* :func:`reduce_shards`: ``dst = (a + b + ...) * scale`` over float32 shared-memory
  segments, counting non-finite results.

The float32 <-> float16 / bfloat16 element conversions the loops inline come from
:mod:`hpcsgd.comm.wire_convert` (LLVM's half conversion where it compiles, bit
manipulation otherwise; both bit-exact against ``numpy.astype`` except signalling
NaN payloads, which stay NaN). The CuPy twins of these kernels are in
:mod:`hpcsgd.comm.wire_gpu`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from hpcsgd.comm.wire_convert import bf16_to_f32, bits_f32, f32_bits, f32_to_bf16, from_f16, to_f16

WIRE_FORMATS = ("float32", "float16", "bfloat16")


def wire_storage_dtype(wire: str) -> np.dtype:
    """NumPy dtype holding a buffer of ``wire`` format (16-bit formats as ``uint16`` bits)."""
    if wire == "float32":
        return np.dtype(np.float32)
    if wire in ("float16", "bfloat16"):
        return np.dtype(np.uint16)
    raise ValueError(f"unknown wire format {wire!r}; choose one of {WIRE_FORMATS}")


def wire_itemsize(wire: str) -> int:
    """Bytes per element on the wire."""
    return wire_storage_dtype(wire).itemsize


# -- array kernels ------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _pack_f32(src, dst, scale):
    for i in range(src.size):
        dst[i] = src[i] * scale


@njit(nogil=True, cache=True)
def _pack_f16(src, dst, scale):
    for i in range(src.size):
        dst[i] = to_f16(src[i] * scale)


@njit(nogil=True, cache=True)
def _pack_bf16(src, dst, scale):
    for i in range(src.size):
        dst[i] = f32_to_bf16(src[i] * scale)


@njit(nogil=True, cache=True)
def _unpack_f32(src, dst, scale):
    bad = 0
    for i in range(src.size):
        v = src[i] * scale
        dst[i] = v
        bad += (v - v) != 0  # inf - inf and nan - nan are nan
    return bad


@njit(nogil=True, cache=True)
def _unpack_f16(src, dst, scale):
    bad = 0
    for i in range(src.size):
        v = from_f16(src[i]) * scale
        dst[i] = v
        bad += (v - v) != 0
    return bad


@njit(nogil=True, cache=True)
def _unpack_bf16(src, dst, scale):
    bad = 0
    for i in range(src.size):
        v = bf16_to_f32(src[i]) * scale
        dst[i] = v
        bad += (v - v) != 0
    return bad


@njit(nogil=True, cache=True)
def _sum_rows_f16(rows, out, acc):
    k, n = rows.shape
    bad = 0
    if k == 2:
        a, b = rows[0], rows[1]
        for i in range(n):
            h = to_f16(from_f16(a[i]) + from_f16(b[i]))
            out[i] = h
            bad += (h & np.uint16(0x7C00)) == np.uint16(0x7C00)
        return bad
    r0 = rows[0]
    for i in range(n):
        acc[i] = from_f16(r0[i])
    for j in range(1, k):
        rj = rows[j]
        for i in range(n):
            acc[i] += from_f16(rj[i])
    for i in range(n):
        h = to_f16(acc[i])
        out[i] = h
        bad += (h & np.uint16(0x7C00)) == np.uint16(0x7C00)
    return bad


@njit(nogil=True, cache=True)
def _sum_rows_bf16(rows, out, acc):
    k, n = rows.shape
    r0 = rows[0]
    for i in range(n):
        acc[i] = bf16_to_f32(r0[i])
    for j in range(1, k):
        rj = rows[j]
        for i in range(n):
            acc[i] += bf16_to_f32(rj[i])
    bad = 0
    for i in range(n):
        h = f32_to_bf16(acc[i])
        out[i] = h
        bad += (h & np.uint16(0x7F80)) == np.uint16(0x7F80)
    return bad


@njit(nogil=True, cache=True)
def _add2_f32(a, b, out, scale):
    bad = 0
    for i in range(out.size):
        v = (a[i] + b[i]) * scale
        out[i] = v
        bad += (v - v) != 0
    return bad


@njit(nogil=True, cache=True)
def _add_into_f32(acc, b):
    for i in range(acc.size):
        acc[i] += b[i]


@njit(nogil=True, cache=True)
def _scale_count_f32(x, scale):
    bad = 0
    for i in range(x.size):
        v = x[i] * scale
        x[i] = v
        bad += (v - v) != 0
    return bad


@njit(nogil=True, cache=True)
def _axpy_add_f32(g, scale, p, out):
    for i in range(out.size):
        out[i] = g[i] * scale + p[i]


@njit(nogil=True, cache=True)
def _axpy_add_both_f32(g, scale, p, out):
    bad = 0
    for i in range(out.size):
        v = g[i] * scale + p[i]
        out[i] = v
        g[i] = v
        bad += (v - v) != 0
    return bad


@njit(nogil=True, cache=True)
def _acc_f16(acc, src):
    for i in range(acc.size):
        acc[i] += from_f16(src[i])


@njit(nogil=True, cache=True)
def _acc_bf16(acc, src):
    for i in range(acc.size):
        acc[i] += bf16_to_f32(src[i])


# -- scaled float16 wire: power-of-two scales chosen per chunk ------------------------------------

#: a chunk is scaled so that its largest magnitude lands in [2^14, 2^15): a float16 value
#: (after rounding) is then at most 2^15, and float32 accumulation keeps the sum in range
HALF_TARGET_EXP = 14
#: exponent clamp: 2^e and 2^-e stay normal float32 numbers (exact scalings)
HALF_EXP_MIN, HALF_EXP_MAX = -126, 126


@njit(nogil=True, cache=True)
def _absmax_bits(u):
    """Largest ``|x|`` of float32 values given as their uint32 bits, as bits; nan counts as 0.

    On the sign-cleared bits, integer order is magnitude order for every non-nan float32
    (inf = 0x7F800000 is the largest). A branch-free integer max reduction vectorizes where
    the float compare-and-branch does not: 8 ms instead of 41 ms for ResNet-50's 25.6M
    values. A nan never sets the scale; it still travels as nan and is counted at unpack.
    """
    m = np.uint32(0)
    for i in range(u.size):
        b = u[i] & np.uint32(0x7FFFFFFF)
        b = b * np.uint32(b <= np.uint32(0x7F800000))  # nan -> 0, branch-free so LLVM vectorizes
        m = max(m, b)
    return m


@njit(cache=True)
def _half_exponent(m):
    """``e`` with ``m * 2^e`` in ``[2^14, 2^15)``, clamped; 0 for zero, inf or nan."""
    if not (m > 0) or m == np.inf:
        return 0
    f = f32_bits(np.float32(m))
    biased = np.int32((f >> np.uint32(23)) & np.uint32(0xFF))
    e = HALF_TARGET_EXP - (biased - 127) if biased > 0 else HALF_EXP_MAX  # float32 subnormal max
    return min(max(e, HALF_EXP_MIN), HALF_EXP_MAX)


@njit(nogil=True, cache=True)
def _sum_scaled_rows_f16(rows, acc):
    """``acc = sum_j float32(rows[j, 1:]) * 2^-e_j`` in row order.

    ``rows[j, 0]`` holds ``e_j`` as int16 bits. The products are exact (power-of-two
    scalings of float16 values inside float32's range); only the additions round.
    """
    k, w = rows.shape
    n = w - 1
    for j in range(k):
        e = np.int32(rows[j, 0])
        if e >= 32768:
            e -= 65536
        s = bits_f32(np.uint32(127 - e) << np.uint32(23))  # 2^-e, exact
        rj = rows[j]
        if j == 0:
            for i in range(n):
                acc[i] = from_f16(rj[i + 1]) * s
        else:
            for i in range(n):
                acc[i] += from_f16(rj[i + 1]) * s


def absmax(x: np.ndarray) -> float:
    """Largest ``|x|`` of a 1-D array, ignoring nan (0 for an empty one); float32 result."""
    if x.size == 0:
        return 0.0
    if x.dtype != np.float32:
        x = np.abs(x).astype(np.float32)
    bits = np.array([_absmax_bits(np.ascontiguousarray(x).view(np.uint32))], dtype=np.uint32)
    return float(bits.view(np.float32)[0])


def half_exponent(m: float) -> int:
    """Power-of-two exponent ``e`` that puts the largest magnitude ``m`` in ``[2^14, 2^15)``.

    ``wire = float16(x * 2^e)`` then never overflows (``|x| * 2^e < 2^15`` before rounding)
    and keeps 29 binades below ``m`` as normal float16 numbers. ``m`` must already be a
    float32 value (the scaled maximum). Zero, inf and nan give 0 (inf/nan then reach the
    wire unchanged and are counted at unpack).
    """
    return int(_half_exponent(np.float32(m)))


def exponent_bits(e: int) -> np.uint16:
    """``e`` as the int16 bits of a chunk header."""
    return np.uint16(e & 0xFFFF)


def exponent_of(bits) -> int:
    """Inverse of :func:`exponent_bits`."""
    b = int(bits)
    return b - 65536 if b >= 32768 else b


def sum_scaled_rows(rows: np.ndarray, acc: np.ndarray) -> float:
    """``acc = sum_j float32(rows[j, 1:]) * 2^-rows[j, 0]`` (float16 rows, row order); max |acc|.

    ``rows`` is a C-contiguous 2-D ``uint16`` array, one scaled chunk per row with its
    exponent in column 0 (see :mod:`hpcsgd.comm.fp16_reduce`); ``acc`` float32.
    """
    _sum_scaled_rows_f16(np.ascontiguousarray(rows), acc)
    return absmax(acc)


_PACK = {"float32": _pack_f32, "float16": _pack_f16, "bfloat16": _pack_bf16}
_UNPACK = {"float32": _unpack_f32, "float16": _unpack_f16, "bfloat16": _unpack_bf16}
_SUM_ROWS = {"float16": _sum_rows_f16, "bfloat16": _sum_rows_bf16}


def pack_into(src: np.ndarray, dst: np.ndarray, scale: float, wire: str) -> None:
    """``dst[:] = wire(src * scale)`` for 1-D float32 ``src`` and 1-D wire-storage ``dst``.

    Non-float32 sources (float16/float64 parameters) take a NumPy path.
    """
    if src.dtype == np.float32:
        _PACK[wire](src, dst, np.float32(scale))
    else:
        _PACK[wire](np.multiply(src, scale, dtype=np.float32), dst, np.float32(1.0))


def unpack_from(src: np.ndarray, dst: np.ndarray, scale: float, wire: str) -> int:
    """``dst[:] = float32(src) * scale``; returns the number of non-finite results.

    ``dst`` may be float16/float64 (NumPy path: cast through a float32 temporary).
    """
    if dst.dtype == np.float32:
        return int(_UNPACK[wire](src, dst, np.float32(scale)))
    tmp = np.empty(dst.shape, np.float32)
    bad = int(_UNPACK[wire](src, tmp, np.float32(scale)))
    dst[...] = tmp
    return bad


def sum_rows_to_wire(rows: np.ndarray, out: np.ndarray, wire: str) -> int:
    """``out = wire(sum_j float32(rows[j]))``: float32 accumulation, one rounding.

    ``rows`` is a C-contiguous 2-D ``uint16`` array of 16-bit wire values (one row
    per rank); returns the number of non-finite (overflowed) results.
    """
    rows = np.ascontiguousarray(rows)
    acc = np.empty(rows.shape[1] if rows.shape[0] != 2 or wire != "float16" else 0, np.float32)
    return int(_SUM_ROWS[wire](rows, out, acc))


def reduce_shards(parts: list, out: np.ndarray, scale: float) -> int:
    """``out = sum(parts) * scale`` over float32 1-D arrays; returns the non-finite count.

    ``out`` may alias ``parts[0]``. Two parts take one fused pass; more parts add up
    pairwise into ``out`` first.
    """
    s = np.float32(scale)
    if len(parts) == 1:
        if out is not parts[0]:
            return int(_unpack_f32(parts[0], out, s))
        return int(_scale_count_f32(out, s))
    if len(parts) == 2:
        return int(_add2_f32(parts[0], parts[1], out, s))
    _add2_f32(parts[0], parts[1], out, np.float32(1.0))
    for p in parts[2:-1]:
        _add_into_f32(out, p)
    return int(_add2_f32(out, parts[-1], out, s))


def scaled_plus(g: np.ndarray, scale: float, parts: list, out: np.ndarray) -> None:
    """``out = g * scale + sum(parts)`` over float32 1-D arrays (``g`` may be float16/64)."""
    if g.dtype != np.float32:
        g = g.astype(np.float32)
    if not parts:
        _pack_f32(g, out, np.float32(scale))
        return
    _axpy_add_f32(g, np.float32(scale), parts[0], out)
    for p in parts[1:]:
        _add_into_f32(out, p)


def scaled_plus_into_both(g: np.ndarray, scale: float, parts: list, out: np.ndarray) -> int:
    """``out = g = g * scale + sum(parts)`` (float32 ``g``); returns the non-finite count.

    The owner of a shard writes the reduced values to the shared segment and to its
    own gradient in one pass.
    """
    if len(parts) == 1:
        return int(_axpy_add_both_f32(g, np.float32(scale), parts[0], out))
    scaled_plus(g, scale, parts, out)
    return int(_unpack_f32(out, g, np.float32(1.0)))


def accumulate(acc: np.ndarray, src: np.ndarray, wire: str) -> None:
    """``acc += float32(src)`` where ``src`` holds ``wire`` values."""
    if wire == "float32":
        _add_into_f32(acc, src)
    elif wire == "float16":
        _acc_f16(acc, src)
    else:
        _acc_bf16(acc, src)


def scale_and_count(x: np.ndarray, scale: float) -> int:
    """In place ``x *= scale`` (float32); returns the non-finite count."""
    return int(_scale_count_f32(x, np.float32(scale)))
