"""BatchNorm link: the four evaluation-statistics modes, single process and across ranks."""

import chainer
import chainer.functions as F
import numpy as np
import pytest

from hpcsgd.errors import ConfigError
from hpcsgd.models import build_model, prepare_for_eval, start_step
from hpcsgd.models.batchnorm import BatchNorm


class OneBN(chainer.Chain):
    def __init__(self, **kw):
        super().__init__()
        with self.init_scope():
            self.bn = BatchNorm(3, **kw)

    def forward(self, x):
        return self.bn(x)


def batch(seed, n=4, shift=0.0):
    return (np.random.RandomState(seed).randn(n, 3, 2, 2) * 2 + shift).astype(np.float32)


def test_training_uses_batch_stats_and_keeps_last():
    m = OneBN(mode="batch")
    x = batch(0)
    y = m(x).array
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean((0, 2, 3), keepdims=True)) / np.sqrt(x64.var((0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    m(batch(1))
    x1 = batch(1).astype(np.float64)
    np.testing.assert_allclose(m.bn.last_mean, x1.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert m.bn.last_count == 16
    np.testing.assert_array_equal(m.bn.avg_mean, 0)  # no moving averages in 'batch' mode
    prepare_for_eval(m)
    np.testing.assert_allclose(m.bn.avg_var, x1.var((0, 2, 3), ddof=1), rtol=1e-5)
    with chainer.using_config("train", False):
        xe = batch(9)
        out = m(xe).array
    expect = (xe - m.bn.avg_mean.reshape(1, 3, 1, 1)) / np.sqrt(m.bn.avg_var.reshape(1, 3, 1, 1) + 1e-5)
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("var_combine", ["corrected", "mean"])
def test_batch_mode_keeps_the_whole_step_under_accumulation(var_combine):
    """After start_step, the kept statistics are those of all micro-batches of the step."""
    m = OneBN(mode="batch", var_combine=var_combine)
    start_step(m)
    m(batch(7, shift=5.0))  # an earlier step: must not leak into the next one
    micro = [batch(s, shift=s) for s in range(3)]  # micro-batches with different means
    start_step(m)
    for x in micro:
        m(x)
    allx = np.concatenate(micro).astype(np.float64)
    np.testing.assert_allclose(m.bn.last_mean, allx.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    prepare_for_eval(m)
    if var_combine == "corrected":  # exactly the unbiased variance of all 48 values per channel
        assert m.bn.last_count == 48
        expect = allx.var((0, 2, 3), ddof=1)
    else:  # the mean of the micro-batches' unbiased variances (AllreducePersistent over micro-batches)
        assert m.bn.last_count == 16
        expect = np.mean([x.astype(np.float64).var((0, 2, 3), ddof=1) for x in micro], axis=0)
    np.testing.assert_allclose(m.bn.avg_var, expect, rtol=1e-5)


def test_running_averages_decay_0_9():
    m = OneBN(mode="running")
    avg_m, avg_v = np.zeros(3), np.ones(3)
    for s in range(3):
        x = batch(s, shift=s).astype(np.float64)
        m(x.astype(np.float32))
        avg_m = 0.9 * avg_m + 0.1 * x.mean((0, 2, 3))
        avg_v = 0.9 * avg_v + 0.1 * x.var((0, 2, 3), ddof=1)
    np.testing.assert_allclose(m.bn.avg_mean, avg_m, rtol=1e-5)
    np.testing.assert_allclose(m.bn.avg_var, avg_v, rtol=1e-5)


def test_recompute_population_stats():
    m = OneBN(mode="recompute")
    m(batch(0))
    xs = [batch(s, shift=s) for s in range(4)]
    assert prepare_for_eval(m, None, batches=[(x, None) for x in xs])["recompute_batches"] == 4
    allx = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(m.bn.avg_mean, allx.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(m.bn.avg_var, allx.var((0, 2, 3), ddof=1), rtol=1e-5)
    with pytest.raises(ConfigError, match="needs batches"):
        prepare_for_eval(m)


def test_batch_mode_needs_a_training_step():
    with pytest.raises(ConfigError, match="training step"):
        prepare_for_eval(OneBN(mode="batch"))


def test_sync_mode_single_rank_equals_plain_bn():
    class OneRank:
        size, rank = 1, 0

        def allreduce(self, x):
            return x.copy()

    a, b = OneBN(mode="sync", comm=OneRank()), OneBN(mode="batch")
    a.cleargrads()
    b.cleargrads()
    x = batch(3)
    xa, xb = chainer.Variable(x.copy()), chainer.Variable(x.copy())
    w = np.random.RandomState(1).randn(*x.shape).astype(np.float32)
    F.sum(a(xa) * w).backward()
    F.sum(b(xb) * w).backward()
    np.testing.assert_allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.bn.gamma.grad, b.bn.gamma.grad, rtol=1e-4, atol=1e-5)


def test_model_level_modes():
    x = np.random.RandomState(0).randn(4, 1, 28, 28).astype(np.float32)
    for mode in ("batch", "recompute", "running"):
        m = build_model("resnet_small", 5, in_channels=1, depth=8, width=4, bn_mode=mode)
        m(x)
        report = prepare_for_eval(m, None, batches=[x, x] if mode == "recompute" else None)
        assert report[mode] == 9
        with chainer.using_config("train", False):
            assert np.isfinite(m(x).array).all()


# The cross-rank BN checks (sync BN vs the concatenated batch, variance combines, recompute,
# running-average averaging) run in tests/test_multi_node_optimizer.py, in the same MPI launch
# as the optimizer checks (tests/mpi/check_bn_sync.py).
