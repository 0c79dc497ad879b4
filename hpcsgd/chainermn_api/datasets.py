"""``scatter_dataset``: give each rank its contiguous share of root's dataset (ChainerMN semantics).

Root's dataset (and, with ``shuffle``, root's permutation of it) is broadcast with
``comm.bcast_obj``; every rank then wraps it in ``chainer.datasets.SubDataset`` over
its index range ``[b, e)`` of the (permuted) order:

* ``force_equal_length=True`` (default): ``b = n * rank // size``, ``e = b +
  ceil(n / size)``. Every rank gets ``ceil(n / size)`` examples; ranges overlap
  where ``size`` does not divide ``n`` (the last ranks repeat examples), which
  multi-node updaters and evaluators need (equal iteration counts).
* ``force_equal_length=False``: the first ``n % size`` ranks get ``n // size + 1``
  examples, the rest ``n // size``; no example is repeated (strict evaluation).

Differences from ChainerMN: the ranges are computed on each rank (the same
arithmetic, no messages); the permutation is drawn on root only; bad arguments
raise ``ValueError`` naming the cause (ChainerMN asserts).
"""

from __future__ import annotations

import chainer
import numpy


class DataSizeError(RuntimeError):
    """ChainerMN's exception for datasets of the wrong size (kept for ``except`` clauses)."""


def _index_range(n: int, size: int, rank: int, force_equal_length: bool) -> tuple[int, int]:
    """Rank ``rank``'s ``[b, e)`` of ``n`` examples over ``size`` ranks (module docstring)."""
    if force_equal_length:
        b = n * rank // size
        return b, b + (n + size - 1) // size
    q, r = divmod(n, size)
    b = rank * q + min(rank, r)
    return b, b + q + (1 if rank < r else 0)


def _check_root(comm, root: int) -> None:
    if not (isinstance(root, (int, numpy.integer)) and 0 <= root < comm.size):
        raise ValueError(f"root must be a rank in [0, {comm.size}), got {root!r}")


def scatter_index(n_total_samples: int, comm, root: int = 0, *, force_equal_length: bool = True):
    """``(b, e)``: this rank's index range of ``n_total_samples`` (root's value is used). Collective."""
    _check_root(comm, root)
    n = comm.bcast_obj(int(n_total_samples) if comm.rank == root else None, root=root)
    if n < 0:
        raise ValueError(f"scatter_index: n_total_samples must be >= 0, got {n}")
    return _index_range(n, comm.size, comm.rank, force_equal_length)


def scatter_dataset(dataset, comm, root: int = 0, shuffle: bool = False, seed=None,
                    max_buf_len: int = 256 * 1024 * 1024, *, force_equal_length: bool = True):
    """This rank's ``SubDataset`` of root's ``dataset`` (see the module docstring). Collective.

    Args:
        dataset: anything with ``len`` and ``[i]`` that pickles; only root's is used.
        comm: an hpcsgd (or ChainerMN) communicator.
        root: the rank whose dataset is scattered.
        shuffle: permute the examples (``numpy.random.RandomState(seed).permutation``
            on root) before splitting; ``seed=None`` draws a fresh permutation.
        seed: seed of that permutation; the same seed gives every example the same rank.
        max_buf_len: bytes per broadcast chunk of the pickled dataset.
        force_equal_length: equal shares (with repeats) or a disjoint split.
    """
    _check_root(comm, root)
    payload = None
    if comm.rank == root:
        if dataset is None:
            payload = ("scatter_dataset: the root rank's dataset is None", None, None)
        else:
            order = numpy.random.RandomState(seed).permutation(len(dataset)) if shuffle else None
            payload = (None, dataset, order)
    error, dataset, order = comm.bcast_obj(payload, max_buf_len=max_buf_len, root=root)
    if error:
        raise ValueError(f"{error} (root={root})")
    b, e = _index_range(len(dataset), comm.size, comm.rank, force_equal_length)
    return chainer.datasets.SubDataset(dataset, b, e, order)


def create_empty_dataset(dataset):
    """A dataset of ``len(dataset)`` empty tuples, for models whose forward takes no input
    (e.g. one that starts with a ``recv`` from another rank)."""
    return [()] * len(dataset)
