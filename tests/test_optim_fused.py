"""The fused CPU update of CorrectedMomentumSGD (hpcsgd.optim.fused) against Chainer's own path.

References: Chainer's per-parameter update of the same rule (``use_fused = False``), Chainer's
:class:`chainer.optimizers.MomentumSGD`, and a float64 NumPy step written out here. Each test
also checks that the fused kernel really ran, so a silent fallback cannot make it pass.
"""

import chainer
import numpy as np
import pytest
from chainer import optimizer_hooks

from hpcsgd.optim import CorrectedMomentumSGD, apply_weight_decay, fused

LRS = [0.4, 0.4, 0.04, 0.04, 0.3, 0.0, 0.2]  # a drop, a rise, a zero LR (no correction after it)


class Net(chainer.Chain):
    """Parameters shaped like the main job's: a 4-D conv weight, a linear weight and bias, BN gamma/beta."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        with self.init_scope():
            self.conv = chainer.Parameter(rng.randn(16, 8, 3, 3).astype(np.float32))
            self.W = chainer.Parameter(rng.randn(10, 32).astype(np.float32))
            self.b = chainer.Parameter(rng.randn(10).astype(np.float32))
            self.gamma = chainer.Parameter(rng.randn(8).astype(np.float32))
            self.beta = chainer.Parameter(rng.randn(8).astype(np.float32))


def set_grads(model, step):
    rng = np.random.RandomState(1000 + step)
    for _, p in sorted(model.namedparams()):
        p.grad = rng.randn(*p.shape).astype(np.float32)


def count_fused(monkeypatch):
    calls = []
    real = fused.momentum_update
    monkeypatch.setattr(fused, "momentum_update", lambda *a: (calls.append(a[0].name), real(*a)))
    return calls


def make(use_fused, nesterov=True, correction=True, decay=1e-2, cls=CorrectedMomentumSGD):
    model = Net()
    opt = cls(lr=LRS[0], momentum=0.9) if cls is chainer.optimizers.MomentumSGD else \
        cls(lr=LRS[0], momentum=0.9, nesterov=nesterov, momentum_correction=correction)
    opt.setup(model)
    if cls is CorrectedMomentumSGD:
        opt.use_fused = use_fused
    apply_weight_decay(opt, decay)
    return model, opt


def run(model, opt, lrs=LRS):
    for step, lr in enumerate(lrs):
        set_grads(model, step)
        opt.lr = lr
        opt.update()


def assert_same(m1, o1, m2, o2):
    """Parameters, gradients (after the decay hook), velocities and counters bitwise equal."""
    assert o1.t == o2.t
    for (n, p), (_, q) in zip(sorted(m1.namedparams()), sorted(m2.namedparams())):
        np.testing.assert_array_equal(p.array, q.array, err_msg=n)
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=n)
        r, s = p.update_rule, q.update_rule
        assert r.t == s.t, n
        if isinstance(o1, CorrectedMomentumSGD) and isinstance(o2, CorrectedMomentumSGD):
            np.testing.assert_array_equal(r.state["v"], s.state["v"], err_msg=n)
            assert r.lr_prev == s.lr_prev, n


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("correction", [True, False])
def test_fused_bitwise_equals_chainer_path(monkeypatch, nesterov, correction):
    calls = count_fused(monkeypatch)
    m1, o1 = make(True, nesterov, correction)
    m2, o2 = make(False, nesterov, correction)
    run(m1, o1)
    run(m2, o2)
    assert len(calls) == 5 * len(LRS)  # every parameter, every step took the fused kernel
    assert_same(m1, o1, m2, o2)


def test_fused_equals_chainer_momentum_sgd(monkeypatch):
    """Without correction and Nesterov the rule is Chainer's MomentumSGD (velocity negated)."""
    calls = count_fused(monkeypatch)
    m1, o1 = make(True, nesterov=False, correction=False)
    m2, o2 = make(None, cls=chainer.optimizers.MomentumSGD)
    run(m1, o1)
    run(m2, o2)
    assert calls
    assert_same(m1, o1, m2, o2)
    for (n, p), (_, q) in zip(sorted(m1.namedparams()), sorted(m2.namedparams())):
        np.testing.assert_array_equal(p.update_rule.state["v"], -q.update_rule.state["v"], err_msg=n)


def test_fused_matches_float64_reference():
    """Weight decay on the weights only, Nesterov, momentum correction: a float64 step by hand."""
    model, opt = make(True, nesterov=True, correction=True, decay=1e-2)
    w = {n: p.array.astype(np.float64) for n, p in sorted(model.namedparams())}
    v = {n: np.zeros_like(a) for n, a in w.items()}
    lr_prev = 0.0
    for step, lr in enumerate(LRS):
        set_grads(model, step)
        g = {n: p.grad.astype(np.float64) for n, p in sorted(model.namedparams())}
        opt.lr = lr
        opt.update()
        c = lr / lr_prev if lr_prev > 0 else 1.0
        for n in w:
            gd = g[n] + (1e-2 * w[n] if n in ("/conv", "/W") else 0.0)
            v_old = v[n]
            v[n] = 0.9 * c * v_old + lr * gd
            w[n] = w[n] - ((1 + 0.9) * v[n] - 0.9 * c * v_old)  # Caffe2's Nesterov form
        lr_prev = lr
        for n, p in sorted(model.namedparams()):
            np.testing.assert_allclose(p.array, w[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_cleared_grad_is_a_zero_gradient(monkeypatch):
    calls = count_fused(monkeypatch)
    (m1, o1), (m2, o2) = make(True), make(False)
    for m, o in ((m1, o1), (m2, o2)):
        run(m, o, LRS[:2])
        set_grads(m, 5)
        m.gamma.grad = None  # e.g. an unused parameter: Chainer reallocates zeros and updates it
        o.update()
    assert "gamma" in calls
    assert_same(m1, o1, m2, o2)


def test_other_hooks_take_chainers_path(monkeypatch):
    """An optimizer hook sends the whole step to Chainer; a rule hook only that parameter."""
    calls = count_fused(monkeypatch)
    (m1, o1), (m2, o2) = make(True), make(False)
    for m, o in ((m1, o1), (m2, o2)):
        m.W.update_rule.add_hook(optimizer_hooks.GradientHardClipping(-0.5, 0.5))
        m.b.update_rule.hyperparam.lr = 0.01  # a per-parameter LR override is honoured
        run(m, o, LRS[:3])
    assert "W" not in calls and "conv" in calls and "b" in calls
    assert_same(m1, o1, m2, o2)
    calls.clear()
    (m1, o1), (m2, o2) = make(True), make(False)
    for o in (o1, o2):
        o.add_hook(optimizer_hooks.GradientClipping(1.0))
    run(m1, o1, LRS[:3])
    run(m2, o2, LRS[:3])
    assert not calls
    assert_same(m1, o1, m2, o2)


def test_serialized_state_round_trips():
    """A fused run resumed from its serialized state continues bitwise like the uninterrupted one."""
    m1, o1 = make(True)
    run(m1, o1, LRS[:3])
    state = {}
    o1.serialize(chainer.serializers.DictionarySerializer(state))
    state = {k: np.array(v, copy=True) for k, v in state.items()}
    m2, o2 = make(True)
    m2.copyparams(m1)
    o2.serialize(chainer.serializers.NpzDeserializer(state))
    for m, o in ((m1, o1), (m2, o2)):
        for step, lr in enumerate(LRS[3:], start=3):
            set_grads(m, step)
            o.lr = lr
            o.update()
    assert_same(m1, o1, m2, o2)
