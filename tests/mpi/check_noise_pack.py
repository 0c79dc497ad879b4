"""Rank-side checks of the pack-pass local squared norm (run by tests/test_noise_pack.py).

For each communicator (naive, flat, hierarchical) and wire (float32, float16), on
gradients accumulated over two micro-batches of a small ResNet, every way the
engine is driven (blocking, overlap on and off, double buffering's async mean)
must publish this rank's float64 |g_local|^2 (the NumPy reference, taken from a
copy of the local gradients before the reduction), and the averaged gradients
must be bitwise those of the same reduction with the measurement off.
"""

from __future__ import annotations

import copy
import gc

import chainer.functions as F
import numpy as np
from mpi4py import MPI

from hpcsgd.comm import create_communicator
from hpcsgd.comm.overlap import OverlappedReducer
from hpcsgd.comm.packing import LOCAL_SQ_NORM
from hpcsgd.models import build_model

ACCUM = 2


class Consumer:
    """Subscribes to LOCAL_SQ_NORM as PackPassLocalNorms does."""


def batch(rank, micro):
    rng = np.random.default_rng(1000 * rank + micro)
    return rng.standard_normal((4, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int32)


def accumulate(model, rank, reducer=None):
    """Two micro-batches, loss / ACCUM each; with ``reducer``, the last backward runs inside it."""
    model.cleargrads()
    for micro in range(ACCUM):
        x, t = batch(rank, micro)
        loss = F.softmax_cross_entropy(model(x), t) / ACCUM
        if reducer is not None and micro == ACCUM - 1:
            with reducer:
                loss.backward()
        else:
            loss.backward()


def grads(model):
    return {n: p.grad.copy() for n, p in sorted(model.namedparams())}


def f64_sq(g) -> float:
    return float(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values()))


def check_published(ref, serial, what):
    value, new = LOCAL_SQ_NORM.read()
    assert new == serial + 1, f"{what}: {new - serial} publications, expected 1"
    assert abs(value - ref) <= 1e-12 * ref, f"{what}: published {value!r}, float64 reference {ref!r}"
    return new


def same_bits(a, b, what):
    for n in a:
        assert np.array_equal(a[n], b[n]), f"{what}: {n} differs with the measurement on"


def run_case(name, wire, rank):
    comm = create_communicator(name, allreduce_grad_dtype=wire)
    model = build_model("resnet_small", 10, depth=8, width=4, bn_mode="batch")
    comm.bcast_data(model)
    accumulate(model, rank)
    local = grads(model)
    ref = f64_sq(local)

    def blocking(m):
        comm.multi_node_mean_grad(m, zero_fill=True)

    def asynchronous(m):
        comm.multi_node_mean_grad_async(m, zero_fill=True).wait()

    for mode, reduce in (("blocking", blocking), ("async", asynchronous)):
        off = copy.deepcopy(model)
        reduce(off)
        on = copy.deepcopy(model)
        consumer = Consumer()
        serial = LOCAL_SQ_NORM.subscribe(consumer)
        reduce(on)
        check_published(ref, serial, f"{name}/{wire}/{mode}")
        same_bits(grads(off), grads(on), f"{name}/{wire}/{mode}")
        del consumer
        gc.collect()
    for overlap in (True, False):
        results = []
        for measured in (False, True):
            reducer = OverlappedReducer(comm, model, bucket_bytes=2048, overlap=overlap)
            consumer = Consumer() if measured else None
            serial = LOCAL_SQ_NORM.subscribe(consumer) if measured else None
            accumulate(model, rank, reducer)
            reducer.wait()
            if measured:
                check_published(ref, serial, f"{name}/{wire}/overlap={overlap}")
            results.append(grads(model))
            reducer.finalize()
            del consumer
            gc.collect()
        same_bits(*results, f"{name}/{wire}/overlap={overlap}")
    comm.finalize()


rank = MPI.COMM_WORLD.Get_rank()
for name in ("naive", "flat", "hierarchical"):
    for wire in ("float32", "float16"):
        run_case(name, wire, rank)
assert not LOCAL_SQ_NORM.armed()
print(f"rank {rank}: noise pack checks ok", flush=True)
