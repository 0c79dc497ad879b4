"""Shared numba settings for hpcsgd's kernels.

``FASTMATH`` allows reassociation (so float reductions vectorise) but keeps
NaN/Inf semantics: non-finite values must still propagate to the gradients,
where hpcsgd's communicators detect them.
"""

from __future__ import annotations

import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def kernel(fn=None, *, parallel: bool = True, cache: bool = True):
    """``numba.njit`` with hpcsgd's defaults: cached on disk, parallel, NaN-safe fastmath."""

    def wrap(f):
        return numba.njit(parallel=parallel, cache=cache, fastmath=FASTMATH, nogil=True)(f)

    return wrap(fn) if fn is not None else wrap


@intrinsic
def stack_scratch(typingctx, like, size):
    """Pointer to ``size`` (a literal int) elements of ``like``'s dtype on the stack frame.

    Why: numba allocates every array on the heap, and LLVM must then assume that stores
    to it may alias the kernel's inputs, so an accumulator array is loaded and stored
    around each multiply-add. A stack slot that never escapes is known not to alias,
    and once the loops over it are unrolled LLVM keeps it in vector registers. Wrap it
    with ``numba.carray(ptr, size)``; it lives until the function returns.
    """
    if not isinstance(size, types.IntegerLiteral) or not isinstance(like, types.Array):
        return None
    n, dtype = size.literal_value, like.dtype

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype), size=n)

    return types.CPointer(dtype)(like, size), codegen


def host_vector_class() -> str:
    """``"avx512"`` when the CPU numba compiles for has AVX-512F, else ``"avx2"`` (the narrow tiles).

    What register tiles must fit: AVX-512 has 32 vector registers of 16 floats, AVX2 16 of
    8, so a tile sized for one spills on the other (10x slower on AMD Zen 3). Read from
    LLVM's host features, the ones numba targets (or ``NUMBA_CPU_FEATURES`` when
    ``NUMBA_CPU_NAME`` names another CPU).
    """
    import os

    from llvmlite import binding as llvm

    target = os.environ.get("NUMBA_CPU_NAME", "host")
    if target != "host":  # numba compiles for a named CPU (e.g. portable caches): its features decide
        return "avx512" if "+avx512f" in os.environ.get("NUMBA_CPU_FEATURES", "") else "avx2"
    try:
        return "avx512" if llvm.get_host_cpu_features().get("avx512f") else "avx2"
    except RuntimeError:  # features unreadable: the narrow tiles run everywhere
        return "avx2"
