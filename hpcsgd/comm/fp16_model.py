"""Exact replay of the hierarchical CPU allreduce's arithmetic for N simulated ranks.

Why: the float16 error of the wire depends on the number of ranks (the values are
divided by it) and on the real gradient magnitudes, and jobs of 1024-4096 ranks
cannot be run here. Every arithmetic step below calls the kernel the real
algorithm calls, with the same operands in the same order, so the result is the
bits every rank of such a job would hold (tests check it against real MPI runs).

Modelled algorithm (:class:`~hpcsgd.comm.hierarchical.HierarchicalAlgorithm`,
``k`` ranks per node, ``M = N / k`` nodes, float32 inside the node):

1. buckets of ``bucket_elems`` float32 of the flat layout; shard ``s`` of a
   bucket is owned by node-local rank ``s``;
2. intra-node reduce-scatter: the owner computes
   ``g_own * (1/N) + sum_{s' != s, in order} fl(g_s' * (1/N))``
   (:func:`kernels.scaled_plus`, peers packed by :func:`kernels.pack_into`);
3. inter-node allreduce of the shard among the ``M`` owners with our pairwise
   reduce-scatter/allgather (not MPICH's ``MPI_Allreduce``: MPI only moves the
   bytes), chunk ``j`` of the shard summed by node ``j`` over the rows of nodes
   ``0 .. M-1`` in that order:

   * ``'predivide'``: rows ``float16(acc)``, :func:`kernels.sum_rows_to_wire`
     (float32 accumulation, one rounding to float16), decoded by ``unpack_from``;
   * ``'chunk'``: rows from :func:`fp16_reduce.encode_chunk`, summed by
     :func:`kernels.sum_scaled_rows`, re-encoded by :func:`fp16_reduce.encode_sum`,
     decoded by :func:`fp16_reduce.decode_chunk`;
   * ``'float32'``: ``MPI_Allreduce`` in float32, modelled as a sum in node order
     (MPICH's order differs; the float32 error is negligible here).
4. the decoded float32 shard goes back through the float32 shared segments
   unchanged.

Ranks get per-rank gradients cyclically: rank ``r`` holds ``grads[r % K]``.
Nodes whose ranks hold the same gradients in the same slots compute the same
shard sums, so each distinct node is computed once and its rows are repeated.
"""

from __future__ import annotations

from math import gcd

import numpy as np

from hpcsgd.comm import fp16_reduce as F
from hpcsgd.comm import wire_kernels as kernels
from hpcsgd.comm.bucket_algorithm import shard_bounds

SCHEMES = ("predivide", "chunk", "float32")


def _node_shard(grads: list, node: int, k: int, s: int, a: int, b: int, scale: np.float32) -> np.ndarray:
    """Owner ``s`` of node ``node``: float32 sum of the shard ``[a, b)`` (step 2)."""
    K = len(grads)
    own = grads[(node * k + s) % K][a:b]
    peers = []
    for t in range(k):
        if t != s:
            seg = np.empty(b - a, np.float32)
            kernels.pack_into(grads[(node * k + t) % K][a:b], seg, scale, "float32")
            peers.append(seg)
    out = np.empty(b - a, np.float32)
    kernels.scaled_plus(own, scale, peers, out)
    return out


def _inter_predivide(accs: list, n_nodes: int) -> np.ndarray:
    """Old scheme: float16(acc) rows, float32 sum per chunk, one rounding, decode."""
    n = accs[0].size
    counts, displs = F.chunk_bounds(n, n_nodes)
    P = len(accs)
    rows16 = np.empty((P, n), np.uint16)
    for p, acc in enumerate(accs):
        kernels.pack_into(acc, rows16[p], 1.0, "float16")
    out = np.empty(n, np.float32)
    order = np.arange(n_nodes) % P  # row i from node i
    for j in range(n_nodes):
        a, c = int(displs[j]), int(counts[j])
        if c == 0:
            continue
        rows = np.ascontiguousarray(rows16[order, a:a + c])
        res = np.empty(c, np.uint16)
        kernels.sum_rows_to_wire(rows, res, "float16")
        kernels.unpack_from(res, out[a:a + c], 1.0, "float16")
    return out


def _inter_chunk(accs: list, n_nodes: int) -> np.ndarray:
    """New scheme: per-message power-of-two scales (:class:`fp16_reduce.ScaledHalfAllreduce`)."""
    n = accs[0].size
    counts, displs = F.chunk_bounds(n, n_nodes)
    out = F.ArraySource(np.empty(n, np.float32))
    srcs = [F.ArraySource(acc) for acc in accs]
    P = len(accs)
    for j in range(n_nodes):
        a, c = int(displs[j]), int(counts[j])
        distinct = np.empty((P, c + 1), np.uint16)
        for p in range(P):
            F.encode_chunk(srcs[p], a, a + c, distinct[p])
        rows = distinct[np.arange(n_nodes) % P]  # row i from node i
        acc = np.empty(c, np.float32)
        m = kernels.sum_scaled_rows(rows, acc)
        slot = np.empty(c + 1, np.uint16)
        F.encode_sum(acc, m, slot)
        F.decode_chunk(out, a, a + c, slot)
    return out.x


def _inter_float32(accs: list, n_nodes: int) -> np.ndarray:
    out = np.zeros(accs[0].size, np.float32)
    for i in range(n_nodes):
        out += accs[i % len(accs)]
    return out


_INTER = {"predivide": _inter_predivide, "chunk": _inter_chunk, "float32": _inter_float32}


def simulate(grads: list, n_ranks: int, scheme: str, ranks_per_node: int = 8,
             bucket_elems: int = 4 << 20) -> np.ndarray:
    """The float32 mean gradient every rank of an ``n_ranks`` job would get.

    Args:
        grads: ``K`` flat float32 gradients (rank ``r`` holds ``grads[r % K]``).
        n_ranks: simulated job size, a multiple of ``ranks_per_node``.
        scheme: inter-node wire, one of :data:`SCHEMES`.
        ranks_per_node: ``k`` (1 models the ``flat`` algorithm: the inter stage is all).
        bucket_elems: elements per bucket (the default is ``hierarchical``'s 16 MiB).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    k = int(ranks_per_node)
    if n_ranks % k:
        raise ValueError(f"n_ranks={n_ranks} is not a multiple of ranks_per_node={k}")
    n_nodes = n_ranks // k
    K = len(grads)
    # node i holds grads (i*k + t) % K: the pattern repeats every K / gcd(K, k) nodes
    period = min(n_nodes, K // gcd(K, k))
    scale = np.float32(1.0 / n_ranks)
    total = grads[0].size
    out = np.empty(total, np.float32)
    for lo in range(0, total, bucket_elems):
        hi = min(lo + bucket_elems, total)
        for s in range(k):
            a, b = shard_bounds(lo, hi, k, s)
            if b <= a:
                continue
            accs = [_node_shard(grads, p, k, s, a, b, scale) for p in range(period)]
            # one node of k > 1 ranks has no inter stage; k = 1 is the flat algorithm (always a wire)
            out[a:b] = accs[0] if n_nodes == 1 and k > 1 else _INTER[scheme](accs, n_nodes)
    return out


def reference(grads: list, n_ranks: int) -> np.ndarray:
    """float64 mean over ``n_ranks`` ranks with cyclic assignment ``grads[r % K]``."""
    K = len(grads)
    counts = np.bincount(np.arange(n_ranks) % K, minlength=K)
    ref = np.zeros(grads[0].size, np.float64)
    for c, g in zip(counts, grads):
        if c:
            ref += c * g.astype(np.float64)
    return ref / n_ranks


def error_stats(got: np.ndarray, ref: np.ndarray) -> dict:
    """Relative L2 error, fraction of nonzero reference values flushed to zero, max relative error."""
    ref = np.asarray(ref, np.float64)
    d = got.astype(np.float64) - ref
    nz = ref != 0
    norm = float(np.linalg.norm(ref))
    return {
        "rel_l2": float(np.linalg.norm(d) / norm) if norm > 0 else 0.0,
        "flushed": float(((got == 0) & nz).sum() / max(1, nz.sum())),
        "max_rel": float(np.max(np.abs(d[nz]) / np.abs(ref[nz]))) if nz.any() else 0.0,
        "nonfinite": int((~np.isfinite(got)).sum()),
    }
