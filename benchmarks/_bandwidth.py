"""Allreduce bandwidth in nccl-tests' two figures, for every allreduce benchmark's JSON.

Why two: *algbw* (bytes of the reduced buffer / time) is what a user's step sees,
but it falls with the rank count even on a perfect network, because a ring
allreduce moves each byte 2(n-1)/n times; *busbw* = algbw x 2(n-1)/n undoes
that, so it compares with the link's own bandwidth and across rank counts
(nccl-tests' PERFORMANCE.md). One rank moves nothing: busbw 0.
"""

from __future__ import annotations


def allreduce_bandwidth(nbytes: float, seconds: float, ranks: int) -> dict:
    """``{"algbw_GBps", "busbw_GBps"}`` (GB = 1e9 bytes) of an allreduce of ``nbytes`` in ``seconds``."""
    if seconds <= 0 or ranks < 1:
        raise ValueError(f"need seconds > 0 and ranks >= 1, got {seconds} s and {ranks} ranks")
    algbw = nbytes / seconds / 1e9
    return {"algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (ranks - 1) / ranks}
