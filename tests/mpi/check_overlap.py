"""Rank-side checks of hpcsgd.comm.overlap and the async mean (run by tests/test_overlap.py).

Every rank computes its own gradients of a small ResNet on its own data; the
reference is the float64 mean of all ranks' gradients (gathered as objects).
The overlapped result must match the reference, be bitwise equal to the same
engine without overlap, and be bitwise equal on every rank. The double-buffering
driver (``multi_node_mean_grad_async``) must be bitwise the blocking result.
"""

from __future__ import annotations

import sys
import warnings

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from mpi4py import MPI

from hpcsgd.comm import create_communicator
from hpcsgd.comm.mpi_base import MpiCommunicatorBase
from hpcsgd.comm.overlap import OverlappedReducer
from hpcsgd.errors import ConfigError, NonFiniteGradientError
from hpcsgd.models import build_model


class MinimalCommunicator(MpiCommunicatorBase):
    def multi_node_mean_grad(self, model, zero_fill=False):
        for _, p in sorted(model.namedparams()):
            if p.grad is not None:
                self._multi_node_mean(None, p.grad)


def make_comm(name):
    return MinimalCommunicator() if name == "base" else create_communicator(name)


def batch(rank, step, n=4, hw=8):
    rng = np.random.default_rng(100 * rank + step)
    return rng.standard_normal((n, 3, hw, hw)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def grads_of(model):
    return {n: p.grad.copy() for n, p in sorted(model.namedparams()) if p.grad is not None}


def backward(model, rank, step, reducer=None):
    x, t = batch(rank, step)
    model.cleargrads()
    loss = F.softmax_cross_entropy(model(x), t)
    if reducer is None:
        loss.backward()
    else:
        with reducer:
            loss.backward()


def reference_mean(comm, model, step):
    backward(model, comm.rank, step)
    every = comm.allgather_obj(grads_of(model))
    return {n: np.mean([g[n].astype(np.float64) for g in every], axis=0) for n in every[0]}


def assert_same_everywhere(comm, grads, what):
    blob = b"".join(grads[n].tobytes() for n in sorted(grads))
    assert len(set(comm.allgather_obj(blob))) == 1, f"{what}: grads differ across ranks"


def check_overlap(comm, model):
    results = {}
    lowp = comm.inter_size > 1  # float16 between (virtual) nodes
    tol = 2e-3 if lowp else 1e-5
    for overlap in (True, False):
        reducer = OverlappedReducer(comm, model, bucket_bytes=2048, overlap=overlap)
        for step in range(2):  # step 0 builds, step 1 runs on the rebuilt (observed) order
            ref = reference_mean(comm, model, step)
            backward(model, comm.rank, step, reducer)
            reducer.wait()
            got = grads_of(model)
            assert set(got) == set(ref), f"grads missing {set(ref) - set(got)}"
            for n in ref:
                assert np.allclose(got[n], ref[n], rtol=tol, atol=tol), \
                    f"overlap={overlap} step {step}: mean of {n} wrong"
            assert_same_everywhere(comm, got, f"overlap={overlap}")
            st = reducer.stats
            if overlap:
                assert st["early_params"] == st["params"], f"hook reported only {st}"
                assert st["buckets"] > 3, st
            else:
                assert st["early_params"] == 0 and st["overlapped_buckets"] == 0, st
            results[(overlap, step)] = got
        reducer.finalize()
    # same layout (step 0, before the overlapped reducer adopts the observed order): same bits
    a, b = results[(True, 0)], results[(False, 0)]
    for n in a:
        assert np.array_equal(a[n], b[n]), f"overlap differs bitwise from no overlap at {n}"


class Tied(chainer.Chain):
    """One Linear used twice (its grad is final only after the second use) and an unused link."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.shared = L.Linear(6, 6, initialW=np.eye(6, dtype=np.float32) * 0.5)
            self.out = L.Linear(6, 3, initialW=np.ones((3, 6), np.float32) * 0.1)
            self.unused = L.Linear(2, 2)
            self.shift = chainer.Parameter(np.zeros((5, 3), np.float32))  # F.add: its grad aliases gy

    def forward(self, x):
        return self.out(F.tanh(self.shared(F.tanh(self.shared(x))))) + self.shift


def check_tied_and_zero_fill(comm):
    model = Tied()
    comm.bcast_data(model)
    x = np.random.default_rng(comm.rank).standard_normal((5, 6)).astype(np.float32)
    model.cleargrads()
    F.sum(model(x) ** 2).backward()
    every = comm.allgather_obj(grads_of(model))
    ref = {n: np.mean([g[n] for g in every], axis=0) for n in every[0]}
    for zero_fill in (True, False):
        reducer = OverlappedReducer(comm, model, bucket_bytes=64, zero_fill=zero_fill)
        model.cleargrads()
        loss = F.sum(model(x) ** 2)
        with reducer:
            loss.backward()
        reducer.wait()
        tol = 2e-3 if comm.inter_size > 1 else 1e-6
        for n, r in ref.items():
            assert np.allclose(dict(model.namedparams())[n].grad, r, rtol=tol, atol=tol), (zero_fill, n)
        unused = model.unused.W.grad
        if zero_fill:
            assert unused is not None and not unused.any(), "zero_fill: unused param must get zeros"
        else:
            assert unused is None, "zero_fill=False must leave a missing grad None"
        reducer.finalize()


def inf_on_last_rank_backward(comm, model, reducer, x, t):
    """The step both non-finite checks start from: the last rank's loss (so its gradients) inf, backward
    under ``reducer``."""
    model.cleargrads()
    loss = F.softmax_cross_entropy(model(x), t)
    if comm.rank == comm.size - 1:
        loss = loss * np.float32(np.inf)
    with reducer:
        loss.backward()


def check_nonfinite_and_async(comm):
    model = build_model("resnet_small", 10, depth=8, width=4, bn_mode="batch")
    comm.bcast_data(model)
    reducer = OverlappedReducer(comm, model)
    x, t = batch(comm.rank, 0)
    inf_on_last_rank_backward(comm, model, reducer, x, t)
    reducer.wait()  # a bare communicator: averaged (ChainerMN), counted
    assert comm.nonfinite_count > 0, "inf gradients must be counted"
    assert len(set(comm.allgather_obj(comm.nonfinite_count))) == 1, "count differs across ranks"
    inf_on_last_rank_backward(comm, model, reducer, x, t)
    try:
        with comm.config_scope("check_finite", True):
            reducer.wait()
    except NonFiniteGradientError as e:
        assert "diverged" in str(e)
    else:
        raise AssertionError("inf gradients on one rank must raise NonFiniteGradientError on every rank")
    # double buffering: start now, compute something, then wait
    tol = 2e-3 if comm.inter_size > 1 else 1e-5
    ref = reference_mean(comm, model, 1)
    backward(model, comm.rank, 1)
    handle = comm.multi_node_mean_grad_async(model)
    np.linalg.svd(np.random.default_rng(0).standard_normal((200, 200)))  # work while it reduces
    handle.wait()
    for n, r in ref.items():
        assert np.allclose(dict(model.namedparams())[n].grad, r, rtol=tol, atol=tol), f"async: {n}"
    reducer.finalize()


def check_comm_async(comm, model):
    """comm.multi_node_mean_grad_async: bitwise the blocking result; the caller may use comm meanwhile."""
    import copy

    backward(model, comm.rank, 5)
    shadow = copy.deepcopy(model)
    comm.multi_node_mean_grad(model)
    handle = comm.multi_node_mean_grad_async(shadow)
    assert comm.allreduce_obj(1) == comm.size  # a collective on comm while the reduction is in flight
    handle.wait()
    for (n, p), (_, q) in zip(sorted(model.namedparams()), sorted(shadow.namedparams())):
        assert np.array_equal(p.grad, q.grad), f"async mean of {n} differs from the blocking one"
    # a second async call first finishes the one in flight; errors surface in wait()
    first = comm.multi_node_mean_grad_async(shadow)
    second = comm.multi_node_mean_grad_async(shadow)
    assert first.test(), "the first reduction must be finished when the second starts"
    second.wait()
    bad = copy.deepcopy(model)
    if comm.rank == 0:
        bad.fc.b.grad = None  # zero_fill=False: some ranks only -> zeros there, a warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        comm.multi_node_mean_grad_async(bad).wait()
    if comm.size > 1:
        assert bad.fc.b.grad is not None, "a grad missing on rank 0 only must get the mean there"
    else:
        assert bad.fc.b.grad is None, "a grad missing on every rank must stay None"
    assert_same_everywhere(comm, grads_of(bad), "async with a grad missing on rank 0")
    # a communicator without a bucket algorithm: overlap is refused with a clear error
    base = MinimalCommunicator()
    try:
        OverlappedReducer(base, model)
    except ConfigError as e:
        assert "overlap: true is not supported by communicator: MinimalCommunicator" in str(e), str(e)
    else:
        raise AssertionError("overlap on a communicator without bucket_algorithm must raise ConfigError")
    base.multi_node_mean_grad_async(shadow).wait()  # the default: reduces at once
    base.finalize()


def main(argv):
    name = argv[0] if argv else "hierarchical"
    comm = make_comm(name)
    model = build_model("resnet_small", 10, depth=8, width=4, bn_mode="batch")
    model(batch(0, 0)[0])
    comm.bcast_data(model)
    check_overlap(comm, model)
    check_comm_async(comm, model)
    check_tied_and_zero_fill(comm)
    check_nonfinite_and_async(comm)
    comm.finalize()
    print(f"rank {MPI.COMM_WORLD.rank}: overlap checks ok on {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
