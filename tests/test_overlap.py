"""Overlapped gradient reduction: the readiness hook (in process) and the reducer on 3 ranks and
2 virtual nodes x 2 ranks against a float64 reference (tests/mpi/check_overlap.py)."""

from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from hpcsgd.comm._engines import Layout
from hpcsgd.comm._grad_ready import GradReadyHook


@pytest.mark.mpi
@pytest.mark.parametrize("n,env", [(3, {}), (4, {"HPCSGD_RANKS_PER_NODE": "2"})], ids=["n3", "n4-2x2"])
def test_overlapped_mean_matches_reference(mpirun, n, env):
    res = mpirun("tests/mpi/check_overlap.py", n, ["hierarchical"], env=env, timeout=240)
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


def test_layout_buckets_cover_every_parameter_in_order():
    sizes = {"a": 10, "b": 300, "c": 5, "d": 1000, "e": 1}
    lay = Layout(["e", "d", "c", "b", "a"], sizes, bucket_bytes=1024)  # 256 floats per bucket
    assert lay.total == sum(sizes.values())
    covered = []
    for start, stop, members in lay.buckets:
        assert stop > start and members
        covered += members
        assert lay.offset[members[0]] == start
        assert stop - start >= 256 or (start, stop, members) == lay.buckets[-1]
    assert covered == ["e", "d", "c", "b", "a"]
    assert lay.bucket_bytes == 1024 and lay.offset["e"] == 0 and lay.offset["d"] == 1


def test_auto_progress_uses_the_communicators_algorithm_when_it_has_one():
    from hpcsgd.comm.overlap import resolve_progress

    class Bucketed:
        def _new_algorithm(self, layout):
            raise NotImplementedError

    assert resolve_progress(Bucketed()) == "comm"
    assert resolve_progress(object()) == "poll"
    assert resolve_progress(object(), "thread") == "thread"
