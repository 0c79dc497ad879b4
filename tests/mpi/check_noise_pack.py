"""Rank-side checks of the pack-pass local squared norm (run by tests/test_noise_pack.py).

For each communicator (naive, flat, hierarchical) and wire (float32, float16), on
gradients accumulated over two micro-batches of a small ResNet, every way the
engine is driven (blocking, overlap on and off, double buffering's async mean)
must publish this rank's float64 |g_local|^2 (the NumPy reference, taken from a
copy of the local gradients before the reduction), and the averaged gradients
must be bitwise those of the same reduction with the measurement off.
Through the optimizers (plain and double buffering), ``NoiseScale`` with the
pack-pass source at ``lag=0`` pairs each applied average with the local norm of
the step that produced it.
"""

from __future__ import annotations

import copy
import gc

import chainer
import chainer.functions as F
import numpy as np
from mpi4py import MPI

from hpcsgd.comm import create_communicator
from hpcsgd.comm.overlap import OverlappedReducer
from hpcsgd.comm.packing import LOCAL_SQ_NORM
from hpcsgd.models import build_model
from hpcsgd.optim.multi_node import create_multi_node_optimizer
from hpcsgd.train.noise_scale import NoiseScale, PackPassLocalNorms

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


def check_pairing(rank, **mode):
    """Step t's applied average (t-1's with double buffering) is paired with that step's local norm."""
    comm = create_communicator("flat")
    model = build_model("resnet_small", 10, depth=8, width=4, bn_mode="batch")
    opt = create_multi_node_optimizer(chainer.optimizers.SGD(lr=0.05), comm, **mode)
    opt.setup(model)
    noise = NoiseScale(4, 4 * comm.size, PackPassLocalNorms(), decay=0.5, lag=0)
    opt.add_hook(noise.big_hook, name="noise_scale", timing="pre")
    stale = bool(mode.get("double_buffering"))
    refs = []
    for step in range(4):
        model.cleargrads()
        x, t = batch(rank, 10 + step)
        F.softmax_cross_entropy(model(x), t).backward()
        refs.append(f64_sq(grads(model)))
        opt.update()
        before = noise.int_small
        noise.end_step()
        if stale and step == 0:
            assert noise.int_n == 0, "double buffering applies nothing at step 0"
            continue
        want = refs[step - 1] if stale else refs[step]
        got = noise.int_small - before
        assert abs(got - want) <= 1e-12 * want, f"{mode} step {step}: paired {got!r}, want {want!r}"
    assert noise.int_n == (3 if stale else 4), (mode, noise.int_n)
    opt.finalize()
    comm.finalize()


rank = MPI.COMM_WORLD.Get_rank()
for mode in ({}, {"double_buffering": True}):
    check_pairing(rank, **mode)
for name in ("naive", "flat", "hierarchical"):
    for wire in ("float32", "float16"):
        run_case(name, wire, rank)
assert not LOCAL_SQ_NORM.armed()
print(f"rank {rank}: noise pack checks ok", flush=True)
