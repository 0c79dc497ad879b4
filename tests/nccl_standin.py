"""A stand-in NCCL for N simulated ranks in one process, and one rank's float16 step on it.

Used by tests/test_nccl_half_scale.py and tests/test_nccl_half_scale_algorithms.py. Each
simulated rank is a thread; a collective completes when every rank of its group has made
the call (one barrier, whose action computes the result). ``allReduce`` MAX on ``uint32``
bit patterns; SUM of float16 (or float32) that, like NCCL, stores every partial sum in that
type, one correctly rounded addition per hop, in ring order (the chunk of an element starts
after its owner and goes once round) or as a binary tree; ``reduceScatter`` and
``allGather`` as NCCL defines them. NumPy arrays stand where CuPy passes device pointers.
"""

from __future__ import annotations

import threading
import types

import numpy as np

from hpcsgd.comm import half_scale
from hpcsgd.comm.packing import BoundGrads, GradLayout, Slot

NCCL = types.SimpleNamespace(NCCL_SUM="sum", NCCL_MAX="max", NCCL_UINT32="uint32", NCCL_FLOAT16="float16",
                       NCCL_FLOAT32="float32")
U = 2.0 ** -11  # float16 unit roundoff


# -- a stand-in NCCL: N ranks as threads, collectives through one barrier ----------------------------


def ring_sum(rows: np.ndarray, dtype=np.float16) -> np.ndarray:
    """Sum over axis 0 in NCCL's ring order, rounding every partial sum to ``dtype``."""
    n_ranks, n = rows.shape
    cols = np.arange(n)
    start = (cols * n_ranks // max(n, 1) + 1) % n_ranks  # element j's chunk starts after its owner
    r64 = rows.astype(np.float64)
    acc = r64[start, cols]
    for hop in range(1, n_ranks):  # float16 + float16 is exact in float64: one rounding per hop
        acc = (acc + r64[(start + hop) % n_ranks, cols]).astype(dtype).astype(np.float64)
    return acc.astype(dtype)


def ring_sum16(rows: np.ndarray) -> np.ndarray:
    return ring_sum(rows, np.float16)


def tree_sum16(rows: np.ndarray) -> np.ndarray:
    """float16 sum over axis 0 as a binary tree (pairs of ranks, then pairs of pairs)."""
    level = rows.astype(np.float16)
    while level.shape[0] > 1:
        odd = level[-1:] if level.shape[0] % 2 else level[:0]
        even = level[0:-1:2] if odd.size else level[0::2]
        pairs = even.astype(np.float64) + level[1::2].astype(np.float64)
        level = np.concatenate([pairs.astype(np.float16), odd])
    return level[0]


class StandInNccl:
    """What hpcsgd calls on a ``cupy.cuda.nccl.NcclCommunicator``, on NumPy arrays instead of pointers."""

    def __init__(self, group: NcclGroup, rank: int):
        self.group, self.rank = group, rank

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 (CuPy's names)
        assert send is recv and count == send.size and stream == 0
        self.group.collect(self.rank, ("allReduce", dtype, op, count), send, recv)

    def reduceScatter(self, send, recv, count, dtype, op, stream):  # noqa: N802
        assert count == recv.size and send.size == count * self.group.n and stream == 0
        self.group.collect(self.rank, ("reduceScatter", dtype, op, count), send, recv)

    def allGather(self, send, recv, count, dtype, stream):  # noqa: N802
        assert count == send.size and recv.size == count * self.group.n and stream == 0
        self.group.collect(self.rank, ("allGather", dtype, None, count), send, recv)


def _typed(b: np.ndarray, dtype: str) -> np.ndarray:
    return b.view(np.float16) if dtype == "float16" else b


class NcclGroup:
    """The ranks of one stand-in communicator: a call completes when every rank has made it."""

    def __init__(self, n_ranks: int, order: str = "ring"):
        self.n, self.order = n_ranks, order
        self.calls: list = [None] * n_ranks
        self.barrier = threading.Barrier(n_ranks, action=self._reduce, timeout=300)
        self.log: list[tuple] = []

    def collect(self, rank: int, kind: tuple, send, recv) -> None:
        self.calls[rank] = (kind, send, recv)
        self.barrier.wait()

    def _sum(self, rows: np.ndarray, dtype: str, op: str) -> np.ndarray:
        if (dtype, op) == ("uint32", "max"):
            return rows.max(axis=0)
        assert op == "sum" and dtype in ("float16", "float32"), (dtype, op)
        if dtype == "float16" and self.order == "tree":
            return tree_sum16(rows)
        return ring_sum(rows, np.dtype(dtype).type)

    def _reduce(self) -> None:
        kinds = {k for k, _, _ in self.calls}
        assert len(kinds) == 1, f"ranks disagree on the collective: {kinds}"
        (name, dtype, op, count), = kinds
        self.log.append((dtype, op) if name == "allReduce" else (name, dtype))
        rows = np.stack([_typed(send, dtype) for _, send, _ in self.calls])  # a copy: recv may alias send
        out = rows.reshape(-1) if name == "allGather" else self._sum(rows, dtype, op)
        for r, (_, _, recv) in enumerate(self.calls):
            _typed(recv, dtype)[...] = out[r * count:(r + 1) * count] if name == "reduceScatter" else out


def run_ranks(n_ranks: int, fn, order: str = "ring"):
    """``[fn(rank, comm) for each rank]``, every rank on its own thread, collectives matched."""
    group = NcclGroup(n_ranks, order)
    out, errors = [None] * n_ranks, []

    def body(r):
        try:
            out[r] = fn(r, StandInNccl(group, r))
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)
            group.barrier.abort()

    old = threading.stack_size(1 << 20)
    try:
        threads = [threading.Thread(target=body, args=(r,)) for r in range(n_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        threading.stack_size(old)
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return out, group


# -- one rank's step, as NcclAllreduceAlgorithm runs it ------------------------------------------------

SIZES = (300, 212)  # two parameters; 600-byte buckets cut the first one off at 300 elements


def layout_of(sizes=SIZES) -> GradLayout:
    offs = np.cumsum((0, *sizes))
    return GradLayout([Slot(f"p{k}", (n,), "float32", int(offs[k]), n) for k, n in enumerate(sizes)])


def mean_on_ranks(x: np.ndarray, half_scaling: str, order: str = "ring", bucket_bytes: int = 600):
    """Per-rank float16 NCCL means of ``x`` (ranks x elements, float32). Returns
    ``(means, non-finite counts, exponents, group)``, one row/entry per rank."""
    n_ranks, n = x.shape
    layout = layout_of((SIZES[0], n - SIZES[0]))
    ranges = layout.bucket_ranges(bucket_bytes, 2)
    x = x.copy()  # the means are written in place

    def rank(r, comm):
        grads = BoundGrads(layout)
        grads.vectors = [x[r, :SIZES[0]], x[r, SIZES[0]:]]
        ops = half_scale.NcclOps(comm, NCCL)
        scales = half_scale.WireScales(ranges, n_ranks, half_scale.uses_scale(["float16"], half_scaling))
        scales.begin_step(grads, [ops])
        buf = np.empty(max(hi - lo for lo, hi in ranges), np.uint16)
        bad = sum(half_scale.nccl_mean_bucket(grads, lo, hi, buf[: hi - lo], "float16", scales.factors(i),
                                              ops, NCCL.NCCL_FLOAT16, i)
                  for i, (lo, hi) in enumerate(ranges))
        return bad, list(scales.exponents)

    res, group = run_ranks(n_ranks, rank, order)
    return x, [b for b, _ in res], [e for _, e in res], group


def rel_l2(got, ref) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def decade_gradients(n_ranks: int, seed: int):
    """Rank x element gradients ``0.01 * 10^-d * N(0, 1)``, ``d = j % 5`` (1e-2 .. 1e-6 per element)."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    d = np.arange(n) % 5
    return (rng.standard_normal((n_ranks, n)) * 0.01 * 10.0 ** -d).astype(np.float32), d
