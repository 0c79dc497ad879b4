"""Rank side of tests/test_data_sharding.py: order, coverage and start safety on 1-4 ranks.

Every sample's label is its index, so the gathered labels show exactly which
samples each rank got.
"""

import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # data_fixtures
from data_fixtures import index_images  # noqa: E402

from hpcsgd.data import Loader, build_dataset, eval_shard  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size


def dataset(n):
    return build_dataset("arrays", images=index_images(n), labels=np.arange(n), n_classes=n)


def gathered_epoch(loader, epoch):
    loader.set_epoch(epoch)
    labels = [t.copy() for _, t in loader]
    return comm.allgather(np.concatenate(labels) if labels else np.zeros(0, np.int32)), len(labels)


for n, b in [(103, 5), (64, 4), (7, 1), (40, 3)]:
    ds = dataset(n)
    loader = Loader(ds, b, rank=rank, size=size, seed=11, workers=0)
    iters = comm.allgather(len(loader))
    assert len(set(iters)) == 1, f"ranks disagree on iterations per epoch: {iters}"
    assert iters[0] == n // (b * size), (iters, n, b, size)
    parts, count = gathered_epoch(loader, 0)
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)), f"n={n}: a sample was seen twice in epoch 0"
    assert len(everything) == iters[0] * b * size
    parts1, _ = gathered_epoch(loader, 1)
    if n > b * size and len(everything) > 1:
        assert not np.array_equal(np.concatenate(parts1), everything), "epoch 1 repeated epoch 0's order"

    padded = Loader(ds, b, rank=rank, size=size, seed=11, workers=0, drop_remainder=False)
    parts, _ = gathered_epoch(padded, 0)
    everything = np.concatenate(parts)
    g = b * size
    assert set(everything.tolist()) == set(range(n)), f"n={n}: padding lost samples"
    assert len(everything) == -(-n // g) * g
    assert len(everything) - n == (-n) % g, "padding duplicated more than the remainder"

    ev = Loader(ds, b, rank=rank, size=size, workers=0, partition="eval")
    parts, _ = gathered_epoch(ev, 0)
    everything = np.sort(np.concatenate(parts))
    assert np.array_equal(everything, np.arange(n)), f"n={n}: eval did not count every sample once"
    mine = eval_shard(n, rank, size)
    assert np.array_equal(parts[rank], np.arange(mine.start, mine.stop))

# Workers under mpiexec: no MPI state, no launcher variables, same batches as in-process.
ds = dataset(48)
with Loader(ds, 4, rank=rank, size=size, seed=5, workers=1, transform="train") as with_workers:
    infos = with_workers.probe_workers()
    for info in infos:
        assert not info["mpi4py_imported"], f"rank {rank}: a data worker imported mpi4py: {info}"
        assert not info["mpi_env"], f"rank {rank}: a worker inherited launcher variables {info['mpi_env']}"
    got = [(x.copy(), t.copy()) for x, t in with_workers]
inline = [(x, t) for x, t in Loader(ds, 4, rank=rank, size=size, seed=5, workers=0, transform="train")]
assert len(got) == len(inline)
for (xa, ta), (xb, tb) in zip(got, inline):
    assert np.array_equal(ta, tb) and np.array_equal(xa, xb), "worker batch differs from in-process batch"
comm.Barrier()
print(f"rank {rank}/{size} data sharding ok")
