"""Scalar float32 <-> float16 / bfloat16 conversions for the wire kernels (numba), and NumPy references.

Why a module of its own: numba has no CPU half type, so the conversion is an
LLVM ``fptrunc``/``fpext`` to ``half`` emitted by a numba ``@intrinsic``. On x86
with F16C (every AVX2 CPU) LLVM lowers it to ``vcvtps2ph``/``vcvtph2ps`` and
vectorises the caller's loop. If that cannot be compiled (a target without
half-precision support where the JIT cannot link ``__truncsfhf2``), the
bit-manipulation versions :func:`soft_f32_to_f16` / :func:`soft_f16_to_f32` (round
to nearest even, subnormals, inf, nan) are used; :data:`HARDWARE_HALF` says which.
:func:`to_f16` / :func:`from_f16` are the chosen pair, inlined into
:mod:`hpcsgd.comm.wire_kernels`' loops.

bfloat16 rounds to nearest even on the upper 16 bits (NaN stays NaN, quieted);
:func:`bf16_bits_reference` is the same rule in NumPy integer ops, for tests.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _llvm_f32_to_f16(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _llvm_f16_to_f32(typingctx, x):
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif x.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@njit(inline="always")
def soft_f32_to_f16(x):
    """Round-to-nearest-even float32 -> float16 bits without hardware support."""
    f = f32_bits(x)
    sign = np.uint16((f >> np.uint32(16)) & np.uint32(0x8000))
    a = f & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf or nan
        if a == np.uint32(0x7F800000):
            return sign | np.uint16(0x7C00)
        return sign | np.uint16(0x7E00) | np.uint16((a >> np.uint32(13)) & np.uint32(0x3FF))
    if a >= np.uint32(0x477FF000):  # rounds to >= 65520: overflow
        return sign | np.uint16(0x7C00)
    if a < np.uint32(0x38800000):  # float16 subnormal or zero
        if a < np.uint32(0x33000000):  # below half the smallest subnormal: +-0
            return sign
        e = a >> np.uint32(23)
        m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        shift = np.uint32(126) - e  # 14 .. 24
        half = m >> shift
        rem = m & ((np.uint32(1) << shift) - np.uint32(1))
        mid = np.uint32(1) << (shift - np.uint32(1))
        if rem > mid or (rem == mid and (half & np.uint32(1)) != 0):
            half += np.uint32(1)
        return sign | np.uint16(half)
    r = a - np.uint32(0x38000000)  # rebias exponent 127 -> 15
    r = r + np.uint32(0xFFF) + ((r >> np.uint32(13)) & np.uint32(1))
    return sign | np.uint16(r >> np.uint32(13))


@njit(inline="always")
def soft_f16_to_f32(h):
    h32 = np.uint32(h)
    sign = (h32 & np.uint32(0x8000)) << np.uint32(16)
    e = (h32 >> np.uint32(10)) & np.uint32(0x1F)
    m = h32 & np.uint32(0x3FF)
    if e == np.uint32(0x1F):
        return bits_f32(sign | np.uint32(0x7F800000) | (m << np.uint32(13)))
    if e == np.uint32(0):
        # subnormal: m * 2^-24 is exact in float32
        v = np.float32(m) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    return bits_f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))


@njit(inline="always")
def f32_to_bf16(x):
    f = f32_bits(x)
    if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # nan: keep it nan (quiet bit)
        return np.uint16((f >> np.uint32(16)) | np.uint32(0x40))
    f = f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))
    return np.uint16(f >> np.uint32(16))


@njit(inline="always")
def bf16_to_f32(h):
    return bits_f32(np.uint32(h) << np.uint32(16))


@njit(cache=True)
def _probe_hardware_half(x, out):
    for i in range(x.size):
        out[i] = _llvm_f32_to_f16(x[i])


def _hardware_half_works() -> bool:
    """True if the LLVM half conversion compiles and matches NumPy on a few probes."""
    try:
        x = np.array([1.0, 65520.0, 1e-8, -2.0 ** -25 * 3, np.inf], np.float32)
        out = np.empty(x.size, np.uint16)
        _probe_hardware_half(x, out)
        with np.errstate(over="ignore"):
            ref = x.astype(np.float16).view(np.uint16)
        return bool((out == ref).all())
    except Exception:
        return False


HARDWARE_HALF = _hardware_half_works()
if HARDWARE_HALF:
    to_f16, from_f16 = _llvm_f32_to_f16, _llvm_f16_to_f32
else:  # pragma: no cover - depends on the CPU/LLVM build
    to_f16, from_f16 = soft_f32_to_f16, soft_f16_to_f32


# -- NumPy references (tests) ------------------------------------------------------------------


def bf16_bits_reference(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with NumPy integer ops (round to nearest even)."""
    f = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    nan = (f & 0x7FFFFFFF) > 0x7F800000
    r = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where(nan, ((f >> 16) | 0x40) & 0xFFFF, r)
    return r.astype(np.uint16)


def bf16_to_f32_reference(h: np.ndarray) -> np.ndarray:
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)
