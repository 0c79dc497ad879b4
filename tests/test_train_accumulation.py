"""Gradient accumulation in the training loop: exactly the gradient of the larger batch (BN aside)."""

import contextlib

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from hpcsgd.models import BatchNorm, prepare_for_eval
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.train.loop import accumulate_gradients


class NoComm:
    def backward_scope(self, last):
        return contextlib.nullcontext()


class MLP(chainer.Chain):
    def __init__(self, bn=False):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(6, 16, initialW=chainer.initializers.Normal(0.5))
            self.l2 = L.Linear(16, 4)
            self.bn = BatchNorm(16, mode="batch") if bn else None

    def forward(self, x):
        h = self.l1(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.l2(F.relu(h))


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


def grads_by_hand(model, x, t):
    """float64 reference: the gradient of the mean loss over the whole batch, from a float64 copy."""
    m64 = model.copy(mode="copy")
    for p in m64.params():
        p.array = p.array.astype(np.float64)
    m64.cleargrads()
    F.softmax_cross_entropy(m64(x.astype(np.float64)), t).backward()
    return {name: p.grad for name, p in m64.namedparams()}


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_accumulated_gradient_equals_the_large_batch_gradient(accum):
    np.random.seed(0)
    model = MLP()
    x, t = data()
    micro = [(x[i::accum], t[i::accum]) for i in range(accum)]  # any split into equal micro-batches
    loss = accumulate_gradients(model, iter(micro), accum, NoComm(), get_tracer())
    ref = grads_by_hand(model, x, t)
    for name, p in model.namedparams():
        np.testing.assert_allclose(p.grad, ref[name], rtol=2e-5, atol=1e-6, err_msg=name)
    with chainer.no_backprop_mode():
        whole = float(F.softmax_cross_entropy(model(x), t).array)
    assert loss == pytest.approx(whole, rel=1e-5)


def test_batch_mode_bn_evaluates_with_the_whole_step_statistics():
    """With accumulation, 'batch'-mode BN keeps the statistics of all micro-batches of the last step."""
    np.random.seed(1)
    model = MLP(bn=True)
    x, t = data(seed=1)
    accumulate_gradients(model, iter([(x[:16], t[:16]), (x[16:], t[16:])]), 2, NoComm(), get_tracer())
    prepare_for_eval(model)
    with chainer.no_backprop_mode():
        h = model.l1(x).array.astype(np.float64)
    np.testing.assert_allclose(model.bn.avg_mean, h.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.bn.avg_var, h.var(axis=0, ddof=1), rtol=1e-4, atol=1e-5)
