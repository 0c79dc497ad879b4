"""The gradient-reduction engine and its overlapped driver: the engine with a fake algorithm and the
readiness hook (in process), and the overlapped/async means on 1-4 ranks and 2 virtual nodes x 2
ranks against a float64 reference (tests/mpi/check_overlap.py)."""

from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from hpcsgd.comm._grad_ready import GradReadyHook
from hpcsgd.comm.bucket_algorithm import BucketAlgorithm


@pytest.mark.mpi
@pytest.mark.parametrize("n,env,name", [(1, {}, "hierarchical"), (2, {}, "naive"), (3, {}, "hierarchical"),
                                        (4, {"HPCSGD_RANKS_PER_NODE": "2"}, "hierarchical"),
                                        (4, {"HPCSGD_RANKS_PER_NODE": "2"}, "flat")],
                         ids=["n1", "n2-naive", "n3", "n4-2x2", "n4-2x2-flat"])
def test_overlapped_mean_matches_reference(mpirun, n, env, name):
    res = mpirun("tests/mpi/check_overlap.py", n, [name], env=env, timeout=240)
    assert res.stdout.count("overlap checks ok") == n, res.stdout


class _Net(chainer.Chain):
    """conv -> BN -> a Linear used twice -> head + shift: multi-use and aliased gradients."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        with self.init_scope():
            self.conv = L.Convolution2D(2, 3, 3, pad=1, initialW=rng.standard_normal((3, 2, 3, 3)) * 0.3)
            self.bn = L.BatchNormalization(3)
            self.shared = L.Linear(12, 12, initialW=rng.standard_normal((12, 12)) * 0.3)
            self.head = L.Linear(12, 4, initialW=rng.standard_normal((4, 12)) * 0.3)
            self.shift = chainer.Parameter(rng.standard_normal((5, 4)).astype(np.float32))

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.reshape(h, (x.shape[0], 12))
        return self.head(F.tanh(self.shared(F.tanh(self.shared(h))))) + self.shift


def _run(model, hook_params, accumulate=False):
    x = np.random.default_rng(1).standard_normal((5, 2, 2, 2)).astype(np.float32)
    if not accumulate:
        model.cleargrads()
    seen = []
    params = dict(model.namedparams())
    hook = GradReadyHook({params[n].node: n for n in hook_params},
                         lambda n, g, owned: seen.append((n, g.copy(), params[n].grad, owned)))
    loss = F.sum(model(x) ** 2)
    with hook:
        loss.backward()
    return seen


def test_hook_reports_each_final_grad_once_before_it_is_stored():
    model = _Net()
    names = [n for n, _ in model.namedparams()]
    seen = _run(model, names)
    assert sorted(n for n, *_ in seen) == sorted(names), "every parameter reported exactly once"
    params = dict(model.namedparams())
    for n, g, grad_at_report, owned in seen:
        assert grad_at_report is None, f"{n}: reported before Chainer stores the grad (early)"
        assert np.array_equal(g, params[n].grad), f"{n}: reported grad is not the final grad"
        # F.add hands the same gy to h and to the shift parameter: never writable early
        assert owned == (n != "/shift"), f"{n}: owned={owned}"
    order = [n for n, *_ in seen]
    # backward order: head first, the twice-used Linear only after its second (earlier) use
    assert order.index("/head/W") < order.index("/shared/W") < order.index("/conv/W")


def test_hook_sees_accumulated_grads():
    model = _Net()
    _run(model, [])
    first = {n: p.grad.copy() for n, p in model.namedparams()}
    seen = _run(model, [n for n, _ in model.namedparams()], accumulate=True)
    for n, g, *_ in seen:
        assert np.allclose(g, 2 * first[n], rtol=1e-6, atol=1e-7), f"{n}: accumulation lost"


class _ListAlgorithm(BucketAlgorithm):
    """A fake per-bucket algorithm: records the buckets it ran (and the thread), doubles their data."""

    def __init__(self, layout, fail_at=None):
        super().__init__(layout, [(lo, min(lo + 4, layout.total)) for lo in range(0, layout.total, 4)])
        self.fail_at = fail_at
        self.ran, self.threads, self.freed = [], set(), False

    def run(self, i):
        import threading

        if i == self.fail_at:
            raise RuntimeError(f"bucket {i} failed")
        self.ran.append(i)
        self.threads.add(threading.current_thread().name)
        lo, hi = self.ranges[i]
        for k, a, b in self.layout.pieces(lo, hi):
            self.grads.piece(k, a, b)[...] *= 2
        return i  # "non-finite count": the engine sums what the buckets return

    def free(self):
        self.freed = True


class _FakeComm:
    def __init__(self, fail_at=None):
        self.fail_at, self.algorithm = fail_at, None

    def bucket_algorithm(self, layout):
        self.algorithm = _ListAlgorithm(layout, self.fail_at)
        return self.algorithm


def _params(sizes):
    out = []
    for i, n in enumerate(sizes):
        p = chainer.Parameter(np.zeros(n, np.float32))
        p.grad = np.arange(n, dtype=np.float32) + 10 * i
        out.append((f"p{i}", p))
    return out


@pytest.mark.parametrize("threaded", [False, True])
def test_engine_runs_every_bucket_in_order_in_place(threaded):
    from hpcsgd.comm.packing import GradLayout
    from hpcsgd.comm.reducer import GradReducer

    params = _params([3, 6, 1, 5])  # the layout order is the caller's, not sorted
    params = [params[2], params[0], params[3], params[1]]
    comm = _FakeComm()
    engine = GradReducer(comm, GradLayout.from_named(params), threaded=threaded)
    before = {n: p.grad.copy() for n, p in params}
    engine.bind(params)
    assert [s.name for s in engine.layout.slots] == [n for n, _ in params]
    with pytest.raises(ValueError, match="in order"):
        engine.launch(1)
    engine.launch_all()
    assert engine.wait() == sum(range(engine.n_buckets))
    assert comm.algorithm.ran == list(range(engine.n_buckets))
    assert comm.algorithm.threads == ({"hpcsgd-grad-reducer"} if threaded else {"MainThread"})
    for n, p in params:
        assert np.array_equal(p.grad, 2 * before[n]), f"{n} not reduced in place"
    assert engine.bucket_params(0) == ["p2", "p0"]  # elements 0-3: p2 (1) and p0's first 3
    engine.close()
    assert comm.algorithm.freed


def test_engine_placed_grads_and_worker_errors():
    from hpcsgd.comm.packing import GradLayout
    from hpcsgd.comm.reducer import GradReducer

    params = _params([4, 4, 4])
    comm = _FakeComm(fail_at=1)
    engine = GradReducer(comm, GradLayout.from_named(params), threaded=True)
    engine.begin()
    shared = params[0][1].grad  # not owned: backward may still read it -> copied
    engine.place(0, shared, owned=False)
    engine.place(1, params[1][1].grad, owned=True)  # reduced in the array itself
    engine.place(2, None, owned=True)  # no gradient: zeros
    engine.launch_all()
    with pytest.raises(RuntimeError, match="bucket 1 failed"):
        engine.wait()
    assert comm.algorithm.ran == [0], "buckets after a failure are not run"
    comm.fail_at = None
    comm.algorithm.fail_at = None
    engine.begin()
    grads = {n: p.grad.copy() for n, p in params}
    engine.place(0, params[0][1].grad, owned=False)
    engine.place(1, params[1][1].grad, owned=True)
    engine.place(2, None, owned=True)
    engine.launch_all()
    engine.wait()
    engine.write_back(dict(params))
    assert np.array_equal(params[0][1].grad, 2 * grads["p0"]) and params[0][1].grad is not shared
    assert np.array_equal(shared, grads["p0"]), "a gradient backward may still read must not change"
    assert np.array_equal(params[1][1].grad, 2 * grads["p1"])
    assert not params[2][1].grad.any()
    engine.close()


def test_overlap_refused_without_bucket_algorithm():
    from hpcsgd.comm.overlap import OverlappedReducer
    from hpcsgd.errors import ConfigError

    with pytest.raises(ConfigError, match="overlap: true is not supported by communicator: object"):
        OverlappedReducer(object(), _Net())
