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
    rounded up to ``oxt``). ``fwd`` and ``bwd`` are the tables of :func:`fwd_taps` and
    :func:`bwd_taps`, offsets in floats for ``nb`` images, as ``(groups, group_counts, taps,
    counts)``: with ``row_groups``, runs of 3 taps on adjacent columns become groups
    (:func:`group_rows`) and ``taps`` keeps the rest; without, there are no groups.
    """

    def __init__(self, h, w, kh, kw, s, ph, pw, nb, oxt, jt, row_groups=False):
        ho, wo = (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1
        self.ho, self.wo = ho, wo
        self.qy = ceil_div(wo, oxt) * oxt
        self.kwp = ceil_div(kw, jt) * jt
        self.qx = max(ceil_div(w + pw, s), self.qy + (kw - 1) // s, wo + (self.kwp - 1) // s)
        self.qgx = ceil_div(ceil_div(w, s), oxt) * oxt
        shifts = [(p + pw - j) // s for p in range(s) for j in range(kw) if (p + pw - j) % s == 0]
        self.lg = max(0, -min(shifts))
        self.qg = max(wo, self.qgx + max(shifts)) + self.lg
        grouped = group_rows if row_groups else _no_groups
        self.fwd = grouped(*fwd_taps(h, kh, kw, s, ph, ho, self.qx, nb), nb)
        self.bwd = grouped(*bwd_taps(h, kh, kw, s, ph, pw, ho, self.qg, self.lg, nb), nb)


@functools.lru_cache(maxsize=64)
def plan(h, w, kh, kw, s, ph, pw, nb, oxt, jt, row_groups=False) -> Plan:
    return Plan(h, w, kh, kw, s, ph, pw, nb, oxt, jt, row_groups)


def _no_groups(taps, counts, nb):
    rows, n_ph = counts.shape
    return np.zeros((rows, n_ph, 1, 4), dtype=np.int64), np.zeros((rows, n_ph), dtype=np.int64), taps, counts


def group_rows(taps, counts, nb):
    """Split a tap table into groups of 3 taps on adjacent columns and the remaining taps.

    Why: a gather tile of 3 output columns then loads the 5 columns a group covers once,
    instead of 3 columns per tap (9 loads), and walks one table entry instead of three (the
    AVX2 tile: 2x the multiply-adds per second on AMD Zen 3). A group is ``(k_a, k_b, k_c,
    offset)``: weights of the columns at ``offset``, ``offset + nb`` and ``offset + 2 nb``.
    Taps run along a kernel row with offsets ``+nb`` apart (forward, stride 1) or ``-nb``
    apart (the input gradient's flipped kernel); anything else stays a single tap.
    """
    rows, n_ph = counts.shape
    groups, rest = [], []
    for r in range(rows):
        for p in range(n_ph):
            e = [tuple(int(v) for v in taps[r, p, t]) for t in range(counts[r, p])]
            g, single, t = [], [], 0
            while t < len(e):
                trio = e[t:t + 3]
                steps = {b[1] - a[1] for a, b in zip(trio, trio[1:])}
                if len(trio) == 3 and steps == {nb}:
                    g.append((trio[0][0], trio[1][0], trio[2][0], trio[0][1]))
                    t += 3
                elif len(trio) == 3 and steps == {-nb}:
                    g.append((trio[2][0], trio[1][0], trio[0][0], trio[2][1]))
                    t += 3
                else:
                    single.append(e[t])
                    t += 1
            groups.append(g)
            rest.append(single)
    g3, gcounts = _table(rows, n_ph, groups, width=4)
    taps1, counts1 = _table(rows, n_ph, rest)
    return g3, gcounts, taps1, counts1


def _table(rows, n_ph, entries, width=2):
    """``(taps[r, p, t] = (k, offset), counts[r, p])`` from per-(row, phase) lists of taps."""
    taps = np.zeros((rows, n_ph, max(1, max(len(e) for e in entries)), width), dtype=np.int64)
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
