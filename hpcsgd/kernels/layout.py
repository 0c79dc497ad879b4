"""Channel-major activations: NCHW arrays whose memory is ordered (C, N, H, W).

Why: on small maps the convolution runs as one GEMM over the whole batch
(:data:`hpcsgd.kernels.conv.BATCHED_BELOW`), whose output is channel-major,
``(Cout, N * H * W)``. Swapping it into NCHW memory after every convolution
and back before the next one cost ResNet-50 at 64 px 170 copies per step
(about 5% of it). Instead the convolution hands on the GEMM's output as an
NCHW-*shaped* view of the channel-major buffer (``t.transpose(1, 0, 2, 3)``),
and every kernel that reads it (batch norm, the residual join, ReLU, the next
convolution) works in that memory order directly. To Chainer and to NumPy code
these are ordinary NCHW arrays: shapes, values and gradients are unchanged, and
code that needs NCHW memory gets it from ``np.ascontiguousarray`` (one copy).

Kernels address an activation by rows: :func:`rows` gives a C-contiguous
``(N * C, H * W)`` matrix and whether it is channel-major, and
:func:`row_index` maps (image, channel) to a row, so a numba kernel keeps
contiguous inner loops in either order.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def channel_major(a: np.ndarray) -> np.ndarray | None:
    """The contiguous (C, N, H, W) buffer behind the NCHW-shaped ``a``, or None if ``a`` is not one.

    An array that is C-contiguous in NCHW too (N or C of 1) counts as NCHW.
    """
    if a.ndim != 4 or a.flags.c_contiguous:
        return None
    t = a.transpose(1, 0, 2, 3)
    return t if t.flags.c_contiguous else None


def nchw_view(t: np.ndarray) -> np.ndarray:
    """The NCHW-shaped view of a contiguous channel-major (C, N, H, W) buffer."""
    return t.transpose(1, 0, 2, 3)


def empty_channel_major(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised NCHW-shaped array of ``shape`` with channel-major memory."""
    n, c = shape[:2]
    return nchw_view(np.empty((c, n) + tuple(shape[2:]), dtype=dtype))


def dense(a: np.ndarray) -> np.ndarray:
    """``a`` if it is NCHW- or channel-major-contiguous, else an NCHW-contiguous copy."""
    return a if a.flags.c_contiguous or channel_major(a) is not None else np.ascontiguousarray(a)


def like(ref: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``a`` (same shape as ``ref``) in ``ref``'s memory order: itself when it already is, else a copy."""
    ref = dense(ref)
    if a.strides == ref.strides and dense(a) is a:
        return a
    out = np.empty_like(ref, dtype=a.dtype)
    out[...] = a
    return out


def flat(a: np.ndarray) -> np.ndarray:
    """The elements of a dense array in memory order, as a 1-D view (elementwise kernels)."""
    return dense(a).ravel(order="K")


def rows(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(matrix, cm)``: a dense 4-D (or 3-D N, C, P) array as C-contiguous rows of H * W.

    ``cm`` says the rows are channel-major (row ``c * N + n``) rather than NCHW
    (row ``n * C + c``); :func:`row_index` maps either. ``a`` must be :func:`dense`.
    """
    t = channel_major(a) if a.ndim == 4 else None
    if t is not None:
        return t.reshape(a.shape[0] * a.shape[1], -1), True
    if not a.flags.c_contiguous:
        raise ValueError("layout.rows needs a dense array (use layout.dense first)")
    return a.reshape(a.shape[0] * a.shape[1], -1), False


@njit(inline="always", cache=True)
def row_index(n, c, n_img, n_ch, cm):
    """Row of (image ``n``, channel ``c``) in :func:`rows`'s matrix."""
    return c * n_img + n if cm else n * n_ch + c
