"""The noise scale's local squared norm from the gradient reduction's bucket pass (packing.LOCAL_SQ_NORM).

In process: ``BoundGrads.sq_norm`` and the engine (``GradReducer``, a fake in-place
algorithm, inline and threaded) against a float64 NumPy |g|^2, under gradient
accumulation; the publish/take protocol; the source choice. Under mpiexec
(tests/mpi/check_noise_pack.py): the real naive/flat/hierarchical reductions,
float32 and float16 wires, blocking, overlap on/off and double buffering, on 2 ranks
and on 2 virtual nodes x 2 ranks.
"""

from __future__ import annotations

import gc

import chainer
import chainer.functions as F
import numpy as np
import pytest

from hpcsgd.comm.bucket_algorithm import BucketAlgorithm
from hpcsgd.comm.packing import LOCAL_SQ_NORM, BoundGrads, GradLayout, LocalSqNorm, select_params
from hpcsgd.comm.reducer import GradReducer
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.train import noise_scale as NS
from hpcsgd.train.loop import accumulate_gradients


def f64_sq(arrays) -> float:
    """The reference: float64 sum of squares, NumPy."""
    return float(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays))


def named(sizes, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        p = chainer.Parameter(np.zeros(n, dtype))
        p.grad = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
        out.append((f"p{i}", p))
    return out


def test_bound_grads_sq_norm_matches_float64_on_any_range():
    params = named([5, 70_000, 1, 33])  # a range may cut parameters; one piece above the SIMD width
    grads = BoundGrads(GradLayout.from_named(params), params)
    flat = np.concatenate([p.grad for _, p in params]).astype(np.float64)
    for lo, hi in [(0, len(flat)), (3, 6), (4, 70_010), (70_005, len(flat)), (7, 7)]:
        assert grads.sq_norm(lo, hi) == pytest.approx(float(flat[lo:hi] @ flat[lo:hi]), rel=1e-12, abs=0)
    half = named([9, 17], seed=1, dtype=np.float16)
    g16 = BoundGrads(GradLayout.from_named(half), half)
    assert g16.sq_norm(0, 26) == pytest.approx(f64_sq(p.grad for _, p in half), rel=1e-12)


class ScaleAndRound(BucketAlgorithm):
    """Stands in for a reduction: overwrites each bucket in place with float16(g / 2), like a pack + mean."""

    def __init__(self, layout):
        super().__init__(layout, [(lo, min(lo + 7, layout.total)) for lo in range(0, layout.total, 7)])

    def run(self, i):
        lo, hi = self.ranges[i]
        for k, a, b in self.layout.pieces(lo, hi):
            piece = self.grads.piece(k, a, b)
            piece[...] = (piece / 2).astype(np.float16)
        return 0

    def free(self):
        pass


class FakeComm:
    def bucket_algorithm(self, layout):
        return ScaleAndRound(layout)


class Consumer:
    """A subscriber of LOCAL_SQ_NORM, as PackPassLocalNorms is."""


def test_unsubscribed_engines_measure_nothing():
    gc.collect()  # consumers of earlier tests are gone
    assert not LOCAL_SQ_NORM.armed()
    params = named([10, 20])
    engine = GradReducer(FakeComm(), GradLayout.from_named(params))
    before = LOCAL_SQ_NORM.read()
    engine.bind(params)
    engine.launch_all()
    engine.wait()
    assert LOCAL_SQ_NORM.read() == before
    engine.close()


def small_model():
    np.random.seed(7)
    from hpcsgd.models import build_model

    return build_model("resnet_small", 4, in_channels=1, depth=8, width=4, bn_mode="batch")


class NoComm:
    def backward_scope(self, last):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("accum", [1, 3])
def test_engine_publishes_the_local_accumulated_norm_before_reducing(threaded, accum):
    """The published value is |g_local|^2 of the accumulated (mean of micro-batches) gradient, in float64.

    Reference: each micro-batch's gradient from its own backward pass, their mean in float64.
    """
    model = small_model()
    rng = np.random.default_rng(8)
    batches = [(rng.standard_normal((6, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, 6).astype(np.int32))
               for _ in range(accum)]
    micro = []
    for x, t in batches:
        model.cleargrads()
        F.softmax_cross_entropy(model(x), t).backward()
        micro.append({n: p.grad.astype(np.float64) for n, p in model.namedparams()})
    ref = f64_sq(sum(m[n] for m in micro) / accum for n in micro[0])
    accumulate_gradients(model, iter(batches), accum, NoComm(), get_tracer())
    params = select_params(model, zero_fill=True)
    local = {n: p.grad.copy() for n, p in params}
    consumer = Consumer()
    serial = LOCAL_SQ_NORM.subscribe(consumer)
    engine = GradReducer(FakeComm(), GradLayout.from_named(params), threaded=threaded)
    engine.bind(params)
    engine.launch_all()
    engine.wait()
    value, new = LOCAL_SQ_NORM.read()
    assert new == serial + 1
    assert value == pytest.approx(ref, rel=1e-5)  # float32 accumulation of micro-batches vs float64
    assert value == pytest.approx(f64_sq(local.values()), rel=1e-12)  # exactly what was packed
    for n, p in params:  # the reduction itself is untouched by the measurement
        assert np.array_equal(p.grad, (local[n] / 2).astype(np.float16).astype(np.float32)), n
    engine.wait()  # a second wait publishes nothing new
    assert LOCAL_SQ_NORM.read()[1] == new
    engine.bind(params)
    engine.launch(0)  # an incomplete step publishes nothing
    engine.wait()
    assert LOCAL_SQ_NORM.read()[1] == new
    engine.close()
    del consumer
    gc.collect()
    assert not LOCAL_SQ_NORM.armed(), "measuring stops once every consumer is gone"


def test_pack_pass_source_takes_each_completed_reduction_once():
    sink = LocalSqNorm()
    local = NS.PackPassLocalNorms()
    local._sink, local._seen = sink, sink.subscribe(local)
    assert sink.armed()
    assert local.take() == (0.0, 0)  # nothing completed yet
    sink.publish(2.5)
    assert local.take() == (2.5, 1)
    assert local.take() == (0.0, 0)  # the same reduction is never counted twice
    sink.publish(4.0)
    sink.publish(3.0)
    assert local.take() == (3.0, 1)  # the latest completed one


def test_noise_scale_with_the_pack_pass_pairs_at_lag_zero():
    """Double buffering: the reduction of step t-1 completes in step t, before the hook that applies it."""
    sink = LocalSqNorm()
    local = NS.PackPassLocalNorms()
    local._sink, local._seen = sink, sink.subscribe(local)
    noise = NS.NoiseScale(4, 16, local, decay=0.5, lag=0)
    noise.end_step()                 # step 0: nothing completed, nothing applied
    sink.publish(10.0)               # step 1: reduction 0 waited for ...
    noise._big = 3.0                 # ... then applied
    noise.end_step()
    assert noise.steps == 1 and noise.int_small == 10.0 and noise.int_big == 3.0


@pytest.mark.parametrize("world, accum, overlap, double, want", [
    (2, 1, False, False, ("PackPassLocalNorms", 8, 0)),
    (2, 1, True, False, ("PackPassLocalNorms", 8, 0)),   # overlap with one micro-batch: now measured
    (2, 1, False, True, ("PackPassLocalNorms", 8, 0)),   # double buffering: published before the hook
    (2, 3, False, False, ("DriverLocalNorms", 8, 0)),    # micro-batches: the per-micro-batch source
    (2, 3, False, True, ("DriverLocalNorms", 8, 1)),
    (1, 3, True, False, ("DriverLocalNorms", 8, 0)),
])
def test_the_local_norm_source_is_chosen_in_one_place(world, accum, overlap, double, want):
    cfg = {"world_size": world, "batch_per_rank": 8, "grad_accumulation": accum, "overlap": overlap,
           "double_buffering": double, "noise_scale": True}
    assert NS.disabled_reason(cfg) is None
    local, b_small, lag = NS.local_source(cfg, small_model())
    assert (type(local).__name__, b_small, lag) == want
    if want[0] == "DriverLocalNorms":
        assert local.skip_last == overlap


@pytest.mark.mpi
@pytest.mark.parametrize("n, env", [(2, {}), (4, {"HPCSGD_RANKS_PER_NODE": "2"})], ids=["n2", "n4-2x2"])
def test_real_reductions_publish_the_local_norm_and_reduce_the_same_bits(mpirun, n, env):
    res = mpirun("tests/mpi/check_noise_pack.py", n, env=env, timeout=300)
    assert res.stdout.count("noise pack checks ok") == n, res.stdout
