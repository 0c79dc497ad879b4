"""Allreduce of 16-bit (float16/bfloat16) buffers with float32 accumulation, over MPI.

MPI has no fast float16 sum (MPICH's built-in FLOAT16 SUM measured about 10x
slower than float32 here), and a user-defined ``MPI.Op`` would round every
partial sum to 16 bits. So the sum is done as ChainerMN's ``inter_allreduce``:

1. reduce-scatter by pairwise exchange (``n - 1`` ``MPI_Sendrecv`` steps; step
   ``s`` sends to ``r + s`` and receives from ``r - s``): rank ``j`` receives chunk
   ``j`` of every rank's buffer, still 16-bit on the wire;
2. a numba kernel adds the ``n`` rows in float32 and rounds once to 16 bits
   (:func:`hpcsgd.comm.wire_kernels.sum_rows_to_wire`);
3. allgather of the summed chunks by the same pairwise exchange, in place.

Pairwise ``Sendrecv`` rather than ``MPI_Alltoallv``/``MPI_Allgatherv``: MPICH's
``Allgatherv(IN_PLACE)`` of 4-8 MB measured 4-300 ms here (vs 2-5 ms for the
same bytes by ``Sendrecv``), on a loaded 2-core machine.

Each chunk is summed by exactly one rank, so the result is bitwise identical on
every rank. Bytes per rank on the wire: ``2 (n-1)/n`` times the buffer, the
bandwidth-optimal amount.

Two float16 schemes (config ``half_scaling`` of the bucketed communicators):

* ``'chunk'`` (default), :class:`ScaledHalfAllreduce`: every message carries
  its own power-of-two scale. A sender scales the chunk it sends so that the
  chunk's largest magnitude lands in ``[2^14, 2^15)`` and puts the exponent in
  a one-element header; the owner unscales each row exactly in float32, adds
  the rows in float32, picks a new exponent for the sum and sends it back the
  same way. No finite gradient can overflow (only a float32 sum beyond 3.4e38
  can), small values keep 11 significant bits down to 2^-29 of the chunk's
  largest value, and there is no extra collective: the exponent rides in the
  message. The chunk sum is still computed by one rank, so every rank decodes
  the same bits.
* ``'predivide'`` (the previous scheme, and what bfloat16 always uses),
  :class:`LowPrecisionAllreduce`: the caller casts ``grad / n`` to 16 bits.
  Overflow cannot happen, but for large ``n`` float16 values fall into the
  subnormal range: at ``n = 1024`` every ``|g| < 0.06`` is subnormal and the
  rounding step is ``2^-24 n = 6e-5`` in gradient units (docs/comm_algorithms.md
  has the measured error on ResNet-50 gradients).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import wire_kernels
from hpcsgd.runtime.watchdog import collective


class LowPrecisionAllreduce:
    """In-place sum over ``comm`` of ``uint16`` buffers holding ``wire`` values.

    Args:
        comm: an mpi4py communicator (the inter-node one in the hierarchical algorithm).
        wire: ``'float16'`` or ``'bfloat16'``.
    """

    def __init__(self, comm, wire: str):
        if wire not in ("float16", "bfloat16"):
            raise ValueError(f"LowPrecisionAllreduce needs a 16-bit wire format, got {wire!r}")
        self.comm, self.wire = comm, wire
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self._rows = np.empty(0, np.uint16)

    def _chunks(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.size
        bounds = np.array([n * j // k for j in range(k + 1)], dtype=np.int64)
        return np.diff(bounds), bounds[:-1]

    def __call__(self, buf: np.ndarray) -> None:
        """Replace ``buf`` (1-D ``uint16``) by the elementwise sum over all ranks. Collective."""
        if self.size == 1 or buf.size == 0:
            return
        counts, displs = self._chunks(buf.size)
        mine = int(counts[self.rank])
        if self._rows.size < self.size * mine:
            self._rows = np.empty(self.size * int(counts.max()), np.uint16)
        rows = self._rows[: self.size * mine].reshape(self.size, mine)  # C-contiguous: row j from rank j
        lo = int(displs[self.rank])
        rows[self.rank] = buf[lo:lo + mine]
        t = MPI.UINT16_T
        r, k = self.rank, self.size
        with collective("allreduce16", nbytes=int(buf.nbytes), stage="reduce_scatter"):
            for step in range(1, k):  # pairwise exchange: chunk r of every rank -> rank r
                dst, src = (r + step) % k, (r - step) % k
                a, n = int(displs[dst]), int(counts[dst])
                self.comm.Sendrecv([buf[a:a + n], t], dst, 16, [rows[src], t], src, 16)
        wire_kernels.sum_rows_to_wire(rows, buf[lo:lo + mine], self.wire)
        with collective("allreduce16", nbytes=int(buf.nbytes), stage="allgather"):
            for step in range(1, k):
                dst, src = (r + step) % k, (r - step) % k
                a, n = int(displs[src]), int(counts[src])
                self.comm.Sendrecv([buf[lo:lo + mine], t], dst, 17, [buf[a:a + n], t], src, 17)


HALF_SCALINGS = ("chunk", "predivide")


def check_half_scaling(value) -> str:
    """Validate the ``half_scaling`` config value (``'chunk'`` or ``'predivide'``)."""
    if value not in HALF_SCALINGS:
        from hpcsgd.errors import ConfigError

        raise ConfigError(f"config 'half_scaling' must be one of {HALF_SCALINGS}, got {value!r}")
    return value


def check_wire_ranks(value):
    """Validate the study-only ``wire_ranks`` config value (None or a positive int)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        from hpcsgd.errors import ConfigError

        raise ConfigError(f"config 'wire_ranks' takes None or a positive int (simulated ranks), "
                          f"got {value!r}")
    return int(value)


class ArraySource:
    """A float32 1-D array as the input and output of :class:`ScaledHalfAllreduce` (in place).

    ``pre`` multiplies the values before they are scaled and cast, ``post`` the sums
    after they are decoded (both float32, 1 by default).
    """

    def __init__(self, x: np.ndarray, pre: float = 1.0, post: float = 1.0):
        self.x, self.n = x, int(x.size)
        self.pre, self.post = np.float32(pre), np.float32(post)

    def absmax(self, a: int, b: int) -> float:
        # the packed value is fl(x * pre) * 2^e: rounding is monotonic, so fl(max * pre) bounds it
        return float(np.float32(wire_kernels.absmax(self.x[a:b])) * self.pre)

    def pack(self, a: int, b: int, dst: np.ndarray, scale: float) -> None:
        wire_kernels.pack_into(self.x[a:b], dst, np.float32(self.pre * np.float32(scale)), "float16")

    def unpack(self, a: int, b: int, src: np.ndarray, scale: float) -> int:
        factor = np.float32(self.post * np.float32(scale))
        return wire_kernels.unpack_from(src, self.x[a:b], factor, "float16")


class GradSource(ArraySource):
    """Flat range ``[lo, lo + n)`` of bound gradients (:class:`~hpcsgd.comm.packing.BoundGrads`)."""

    def __init__(self, grads, lo: int, n: int, pre: float = 1.0, post: float = 1.0):
        self.grads, self.lo, self.n = grads, int(lo), int(n)
        self.pre, self.post = np.float32(pre), np.float32(post)

    def absmax(self, a: int, b: int) -> float:
        m = 0.0
        for i, pa, pb in self.grads.layout.pieces(self.lo + a, self.lo + b):
            m = max(m, wire_kernels.absmax(self.grads.piece(i, pa, pb)))
        return float(np.float32(m) * self.pre)

    def pack(self, a: int, b: int, dst: np.ndarray, scale: float) -> None:
        self.grads.pack(self.lo + a, self.lo + b, dst, np.float32(self.pre * np.float32(scale)), "float16")

    def unpack(self, a: int, b: int, src: np.ndarray, scale: float) -> int:
        return self.grads.unpack(self.lo + a, self.lo + b, src, np.float32(self.post * np.float32(scale)),
                                 "float16")


def pow2(e: int) -> np.float32:
    """``2^e`` as an exact float32 (``e`` within the clamp of :func:`wire_kernels.half_exponent`)."""
    return np.float32(np.ldexp(np.float32(1.0), e))


def encode_chunk(src, a: int, b: int, slot: np.ndarray) -> None:
    """``slot = [e, float16(src[a:b] * 2^e)]`` with ``e`` from the chunk's largest magnitude."""
    e = wire_kernels.half_exponent(src.absmax(a, b))
    slot[0] = wire_kernels.exponent_bits(e)
    src.pack(a, b, slot[1:], pow2(e))


def encode_sum(acc: np.ndarray, m: float, slot: np.ndarray) -> None:
    """``slot = [e, float16(acc * 2^e)]`` for a float32 chunk sum whose largest magnitude is ``m``."""
    e = wire_kernels.half_exponent(m)
    slot[0] = wire_kernels.exponent_bits(e)
    wire_kernels.pack_into(acc, slot[1:], pow2(e), "float16")


def decode_chunk(dst, a: int, b: int, slot: np.ndarray) -> int:
    """``dst[a:b] = float32(slot[1:]) * 2^-e``; returns the non-finite count."""
    return dst.unpack(a, b, slot[1:], pow2(-wire_kernels.exponent_of(slot[0])))


def chunk_bounds(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, displs)`` of ``k`` near-equal chunks of ``n`` elements (the owner split)."""
    bounds = np.array([n * j // k for j in range(k + 1)], dtype=np.int64)
    return np.diff(bounds), bounds[:-1]


class ScaledHalfAllreduce:
    """float16 allreduce with a power-of-two scale per message (the ``'chunk'`` scheme).

    1. reduce-scatter: for step ``s = 1 .. n-1`` rank ``r`` encodes chunk ``r + s``
       of its input (:func:`encode_chunk`: exponent header + scaled float16) and
       sends it to its owner, receiving chunk ``r`` of rank ``r - s``;
    2. the owner adds the ``n`` rows in rank order in float32, each unscaled exactly
       (:func:`wire_kernels.sum_scaled_rows`), and encodes the sum with a new exponent;
    3. allgather of the encoded sums by the same pairwise exchange; every rank, the
       owner included, decodes every chunk from its float16 bits.

    Each message is ``count + 1`` ``uint16`` (2 bytes of header). Args: ``comm``, an
    mpi4py communicator.
    """

    def __init__(self, comm):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self._buf = np.empty(0, np.uint16)
        self._rows = np.empty(0, np.uint16)
        self._acc = np.empty(0, np.float32)

    def _buffers(self, counts: np.ndarray, mine: int):
        k = self.size
        if self._buf.size < int(counts.sum()) + k:
            self._buf = np.empty(int(counts.sum()) + k, np.uint16)
        if self._rows.size < k * (mine + 1):
            self._rows = np.empty(k * (int(counts.max()) + 1), np.uint16)
            self._acc = np.empty(int(counts.max()), np.float32)
        return self._rows[: k * (mine + 1)].reshape(k, mine + 1), self._acc[:mine]

    def __call__(self, src) -> int:
        """Replace the values of ``src`` (:class:`ArraySource`/:class:`GradSource`) by their
        sum over all ranks; returns the non-finite count of the result (same on every rank).
        Collective."""
        k, r, n = self.size, self.rank, src.n
        counts, displs = chunk_bounds(n, k)
        slot_at = displs + np.arange(k)  # slot j: header + chunk j

        def slot(j):
            return self._buf[slot_at[j]:slot_at[j] + counts[j] + 1]

        mine = int(counts[r])
        rows, acc = self._buffers(counts, mine)
        lo = int(displs[r])
        t = MPI.UINT16_T
        with collective("allreduce16", nbytes=int(2 * n), stage="reduce_scatter"):
            for step in range(1, k):
                dst, frm = (r + step) % k, (r - step) % k
                encode_chunk(src, int(displs[dst]), int(displs[dst] + counts[dst]), slot(dst))
                self.comm.Sendrecv([slot(dst), t], dst, 18, [rows[frm], t], frm, 18)
        encode_chunk(src, lo, lo + mine, rows[r])
        m = wire_kernels.sum_scaled_rows(rows, acc)
        encode_sum(acc, m, slot(r))
        with collective("allreduce16", nbytes=int(2 * n), stage="allgather"):
            for step in range(1, k):
                dst, frm = (r + step) % k, (r - step) % k
                self.comm.Sendrecv([slot(r), t], dst, 19, [slot(frm), t], frm, 19)
        bad = 0
        for j in range(k):
            bad += decode_chunk(src, int(displs[j]), int(displs[j] + counts[j]), slot(j))
        return bad
