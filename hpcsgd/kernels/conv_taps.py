"""Block shapes and tap tables of :mod:`hpcsgd.kernels.conv_direct` (plain Python, once per shape).

Why separate: the kernels only walk these tables; every index rule of the block
layout (padding, column phases, which taps reach which output phase) lives here, where
it is checked once per convolution shape instead of per element.
"""

from __future__ import annotations

import functools

import numpy as np


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Plan:
    """Block shapes and tap tables of one convolution shape for tiles of ``oxt`` columns.

    ``qx``: columns per phase of the input block (left pad ``pw``); ``qy``: output columns
    computed (``wo`` rounded up to ``oxt``); ``kwp``: taps per kernel row of the weight
    gradient (``kw`` rounded up to ``jt``); ``qg``, ``lg``: columns and left pad of the
    output-gradient block; ``qgx``: input-gradient columns per phase (``ceil(w / s)``
    rounded up to ``oxt``). ``fwd`` and ``bwd`` are ``(taps, counts)`` pairs of
    :func:`fwd_taps` and :func:`bwd_taps`, offsets in floats for ``nb`` images.
    """

    def __init__(self, h, w, kh, kw, s, ph, pw, nb, oxt, jt):
        ho, wo = (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1
        self.ho, self.wo = ho, wo
        self.qy = ceil_div(wo, oxt) * oxt
        self.kwp = ceil_div(kw, jt) * jt
        self.qx = max(ceil_div(w + pw, s), self.qy + (kw - 1) // s, wo + (self.kwp - 1) // s)
        self.qgx = ceil_div(ceil_div(w, s), oxt) * oxt
        shifts = [(p + pw - j) // s for p in range(s) for j in range(kw) if (p + pw - j) % s == 0]
        self.lg = max(0, -min(shifts))
        self.qg = max(wo, self.qgx + max(shifts)) + self.lg
        self.fwd = fwd_taps(h, kh, kw, s, ph, ho, self.qx, nb)
        self.bwd = bwd_taps(h, kh, kw, s, ph, pw, ho, self.qg, self.lg, nb)


@functools.lru_cache(maxsize=64)
def plan(h, w, kh, kw, s, ph, pw, nb, oxt, jt) -> Plan:
    return Plan(h, w, kh, kw, s, ph, pw, nb, oxt, jt)


def _table(rows, n_ph, entries):
    """``(taps[r, p, t] = (k, offset), counts[r, p])`` from per-(row, phase) lists of taps."""
    taps = np.zeros((rows, n_ph, max(1, max(len(e) for e in entries)), 2), dtype=np.int64)
    counts = np.zeros((rows, n_ph), dtype=np.int64)
    for idx, e in enumerate(entries):
        r, p = divmod(idx, n_ph)
        counts[r, p] = len(e)
        if e:
            taps[r, p, :len(e)] = e
    return taps, counts


def fwd_taps(h, kh, kw, s, ph, ho, qx, nb):
    """Forward gather: output row ``oy`` reads input row ``s*oy+i-ph``, phase ``j % s``, shift ``j // s``."""
    entries = []
    for oy in range(ho):
        e = []
        for i in range(kh):
            iy = s * oy + i - ph
            if 0 <= iy < h:
                e += [(i * kw + j, ((iy * s + j % s) * qx + j // s) * nb) for j in range(kw)]
        entries.append(e)
    return _table(ho, 1, entries)


def bwd_taps(h, kh, kw, s, ph, pw, ho, qg, lg, nb):
    """Input gradient as a gather: ``gx[iy, s*q + p]`` reads ``gy[oy, q + (p + pw - j) / s]``.

    Only taps with ``iy + ph - i = s * oy`` (``0 <= oy < ho``) and ``p + pw - j`` a multiple
    of ``s`` contribute; ``gy``'s block has ``lg`` zero columns on the left.
    """
    entries = []
    for iy in range(h):
        for p in range(s):
            e = []
            for i in range(kh):
                oy, rem = divmod(iy + ph - i, s)
                if rem or not 0 <= oy < ho:
                    continue
                e += [(i * kw + j, (oy * qg + (p + pw - j) // s + lg) * nb)
                      for j in range(kw) if (p + pw - j) % s == 0]
            entries.append(e)
    return _table(h, s, entries)
