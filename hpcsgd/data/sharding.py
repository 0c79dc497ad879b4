"""Which samples each rank reads, per epoch: one shared permutation, equal slices.

Training order
--------------
Every epoch ``e`` draws one permutation of ``range(n)`` from ``(seed, e)``; all
ranks share ``seed`` so all ranks compute the same permutation without talking.
The permutation is cut into *global batches* of ``batch_size * size`` samples;
global batch ``k`` is ``perm[k*G:(k+1)*G]`` and rank ``r`` takes its
``r``-th sub-slice of ``batch_size`` samples. So every rank runs the same
number of iterations, and the samples of one global batch do not depend on how
it is split over ranks.

Remainder policy (the last ``n % G`` samples of the permutation):

* ``drop_remainder=True`` (default): dropped. Because the permutation changes
  every epoch, a different set is dropped each epoch; no sample is seen twice
  in an epoch, ``n % G`` samples are not seen in that epoch.
* ``drop_remainder=False``: the permutation is padded to a multiple of ``G``
  by wrapping around to its start, identically on every rank; every sample is
  seen at least once and ``G - n % G`` samples (the first ones of the
  permutation) are seen twice in that epoch.

Evaluation uses :func:`eval_shard` instead: contiguous, near-equal ranges that
cover every sample exactly once (ranks may differ by one sample).
"""

from __future__ import annotations

import numpy as np

from hpcsgd.errors import ConfigError


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of ``epoch`` (int64, length ``n``), identical on every rank."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), 0x5EED])))
    return rng.permutation(n).astype(np.int64, copy=False)


def iterations_per_epoch(n: int, batch_size: int, size: int, drop_remainder: bool = True) -> int:
    """Iterations every rank runs per epoch (the same on all ranks)."""
    if batch_size < 1 or size < 1:
        raise ConfigError(f"batch_size ({batch_size}) and size ({size}) must be >= 1")
    global_batch = batch_size * size
    if drop_remainder:
        return n // global_batch
    return -(-n // global_batch)


def rank_batch_indices(perm: np.ndarray, k: int, batch_size: int, rank: int, size: int) -> np.ndarray:
    """Sample indices of rank ``rank``'s part of global batch ``k`` (wraps around to pad)."""
    n = len(perm)
    start = (k * size + rank) * batch_size
    pos = np.arange(start, start + batch_size, dtype=np.int64)
    if pos[-1] >= n:
        pos %= n  # padding: wrap to the start of the permutation, same on every rank
    return perm[pos]


def epoch_plan(n: int, batch_size: int, rank: int, size: int, seed: int, epoch: int,
               shuffle: bool = True, drop_remainder: bool = True) -> list[np.ndarray]:
    """All of rank ``rank``'s batches for ``epoch``, as index arrays (for tests and tools)."""
    perm = epoch_permutation(n, seed, epoch, shuffle)
    iters = iterations_per_epoch(n, batch_size, size, drop_remainder)
    return [rank_batch_indices(perm, k, batch_size, rank, size) for k in range(iters)]


def eval_shard(n: int, rank: int, size: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` evaluation samples.

    The ranges of ranks ``0..size-1`` partition ``range(n)``: every sample is
    counted exactly once, the remainder included; sizes differ by at most one.
    """
    if not 0 <= rank < size:
        raise ConfigError(f"rank {rank} out of range for size {size}")
    return range(n * rank // size, n * (rank + 1) // size)
