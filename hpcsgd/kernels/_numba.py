"""Shared numba settings for hpcsgd's kernels.

``FASTMATH`` allows reassociation (so float reductions vectorise) but keeps
NaN/Inf semantics: non-finite values must still propagate to the gradients,
where hpcsgd's communicators detect them.
"""

from __future__ import annotations

import numba

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def kernel(fn=None, *, parallel: bool = True):
    """``numba.njit`` with hpcsgd's defaults: cached on disk, parallel, NaN-safe fastmath."""

    def wrap(f):
        return numba.njit(parallel=parallel, cache=True, fastmath=FASTMATH, nogil=True)(f)

    return wrap(fn) if fn is not None else wrap
