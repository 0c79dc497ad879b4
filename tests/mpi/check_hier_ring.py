"""Ranks for tests/test_hier_ring.py: the hierarchical allreduce's two staging slots under skew.

The node stage stages each bucket in one of two slots per rank, used in turn by
consecutive buckets (``hpcsgd.comm.hierarchical.RING_SLOTS``). A slot is safe to
overwrite two buckets later because every rank passes the next bucket's first
fence only after every peer has finished reading the previous one. This check
makes the race as likely as it can: buckets of unequal length (the last bucket of
a call is short, so the next call's first bucket's shards cover other slot
positions), many calls in a row with fresh gradients, and a seeded random delay on
every rank before each allgather read (a slow reader while the others run ahead
into the next buckets). Every call's mean must equal the float64 reference within
the float32 bound of tests/mpi/check_allreduce.py, bitwise equal on every rank.

Negative control (by hand, not a test: it depends on timing): with
``HPCSGD_CHECK_RING_SLOTS=1`` the delayed reader sees the next bucket's staged
values and this check fails.
"""

from __future__ import annotations

import hashlib
import os
import time

import chainer
import numpy as np
from mpi4py import MPI

import hpcsgd
from hpcsgd.comm import hierarchical, packing

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
if "HPCSGD_CHECK_RING_SLOTS" in os.environ:
    hierarchical.RING_SLOTS = int(os.environ["HPCSGD_CHECK_RING_SLOTS"])
SHAPES = {"a": (1000,), "b": (37, 11), "c": (3000,), "d": (5,), "e": (2049,)}


def make_model():
    link = chainer.Link()
    with link.init_scope():
        for name, shape in SHAPES.items():
            setattr(link, name, chainer.Parameter(np.zeros(shape, np.float32)))
    return link


def slow_reader(rng):
    """Delay every allgather read (unpack) of this rank by a seeded random 0-3 ms."""
    unpack = packing.BoundGrads.unpack

    def delayed(self, *args, **kwargs):
        time.sleep(rng.uniform(0, 3e-3))
        return unpack(self, *args, **kwargs)

    packing.BoundGrads.unpack = delayed


def main():
    model = make_model()
    comm = hpcsgd.create_communicator(  # 1500-element buckets; float32 between nodes too
        "hierarchical", bucket_bytes=4 * 1500, allreduce_grad_dtype="float32")
    slow_reader(np.random.default_rng(100 + rank))
    calls = []
    run = hierarchical.HierarchicalAlgorithm.run
    hierarchical.HierarchicalAlgorithm.run = lambda self, i: calls.append(i) or run(self, i)
    for call in range(12):
        local = {}
        for name, p in sorted(model.namedparams()):
            g = np.random.default_rng([call, rank, len(name), p.size]).standard_normal(p.shape)
            p.grad = g.astype(np.float32)
            local[name] = p.grad.astype(np.float64)
        refs = {k: sum(world.allgather(v)) / size for k, v in local.items()}
        mabs = {k: sum(np.abs(x) for x in world.allgather(v)) / size for k, v in local.items()}
        comm.multi_node_mean_grad(model)
        for name, p in sorted(model.namedparams()):
            bound = 4 * (size + 2) * 2.0 ** -24 * mabs[name] + 1e-30
            err = np.abs(p.grad - refs[name])
            assert (err <= bound).all(), f"call {call} {name}: max error {err.max():.3g} > bound"
        grads = b"".join(p.grad.tobytes() for _, p in sorted(model.namedparams()))
        digest = hashlib.sha256(grads).hexdigest()
        assert len(set(world.allgather(digest))) == 1, f"call {call}: ranks differ"
    assert len(calls) == 12 * 5 and sorted(set(calls)) == list(range(5)), calls  # 5 buckets per call
    print(f"rank {rank}: hierarchical ring checks passed", flush=True)


main()
