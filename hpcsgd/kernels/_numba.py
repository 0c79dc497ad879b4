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


def kernel(fn=None, *, parallel: bool = True):
    """``numba.njit`` with hpcsgd's defaults: cached on disk, parallel, NaN-safe fastmath."""

    def wrap(f):
        return numba.njit(parallel=parallel, cache=True, fastmath=FASTMATH, nogil=True)(f)

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
