"""Top-1/top-5 over the whole validation set, every sample counted exactly once across ranks.

Each rank evaluates its own contiguous shard (``hpcsgd.data.eval_shard``: the
remainder is spread over the first ranks, nothing is dropped or duplicated),
counts correct predictions, and ONE ``Allreduce`` (SUM) of
``[top1, top5, loss_sum, n]`` gives the global result; the sample count is
checked against the dataset length.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from hpcsgd.runtime.watchdog import collective


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Number of rows whose label is among the ``k`` largest logits (k clipped to the class count)."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def local_counts(model, batches: Iterable) -> np.ndarray:
    """[top1 correct, top5 correct, summed loss, samples] over this rank's batches (float64)."""
    import chainer
    import chainer.functions as F
    from chainer.backends import cuda

    counts = np.zeros(4)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for x, t in batches:
            if len(t) == 0:
                continue
            xp = getattr(model, "xp", np)
            x, t = xp.asarray(x), xp.asarray(t)
            y = model(x)
            loss = F.softmax_cross_entropy(y, t, reduce="no")
            logits, labels = cuda.to_cpu(y.array), cuda.to_cpu(t)
            counts += (topk_correct(logits, labels, 1), topk_correct(logits, labels, 5),
                       float(cuda.to_cpu(loss.array).astype(np.float64).sum()), len(labels))
    return counts


def evaluate(model, batches: Iterable, comm, n_total: int | None = None) -> dict:
    """Collective. Returns {'top1', 'top5', 'loss', 'samples'} over all ranks.

    Raises ``RuntimeError`` if the ranks together did not see exactly ``n_total``
    samples (when given): a sharding bug must not pass silently.
    """
    from mpi4py import MPI

    mpi = getattr(comm, "mpi_comm", comm)
    local = local_counts(model, batches)
    total = np.empty_like(local)
    with collective("allreduce", what="evaluation counts"):
        mpi.Allreduce(local, total, op=MPI.SUM)
    n = int(total[3])
    if n_total is not None and n != n_total:
        raise RuntimeError(f"evaluation counted {n} samples across ranks, the validation set has {n_total}")
    return {"top1": total[0] / max(n, 1), "top5": total[1] / max(n, 1), "loss": total[2] / max(n, 1),
            "samples": n}
