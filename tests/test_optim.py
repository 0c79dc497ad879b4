"""Every update rule against a step computed by hand in float64 NumPy."""

import chainer
import numpy as np
import pytest

from hpcsgd.optim import LARS, CorrectedMomentumSGD, RMSpropWarmup, apply_weight_decay
from hpcsgd.optim.weight_decay import is_bn_or_bias


class Toy(chainer.Chain):
    """A conv-like weight, a bias and a BN-like gamma/beta (names matter for the skip lists)."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        with self.init_scope():
            self.W = chainer.Parameter(rng.randn(4, 3).astype(np.float32))
            self.b = chainer.Parameter(rng.randn(4).astype(np.float32))
            self.gamma = chainer.Parameter(rng.randn(4).astype(np.float32))
            self.zero = chainer.Parameter(np.zeros((2, 2), np.float32))  # ||w|| = 0: LARS ratio 1


def grads_for(model, step, seed=1):
    rng = np.random.RandomState(seed + 100 * step)
    out = {}
    for name, p in sorted(model.namedparams()):
        g = rng.randn(*p.shape).astype(np.float32)
        p.grad = g.copy()
        out[name] = g.astype(np.float64)
    return out


def params64(model):
    return {n: p.array.astype(np.float64) for n, p in sorted(model.namedparams())}


def check_close(model, ref, rtol=2e-5, atol=2e-6):
    for name, p in sorted(model.namedparams()):
        np.testing.assert_allclose(p.array, ref[name], rtol=rtol, atol=atol, err_msg=name)


LRS = [0.5, 0.5, 0.05, 0.05, 0.2]  # includes a drop (momentum correction) and a rise


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("correction", [True, False])
def test_corrected_momentum_sgd(nesterov, correction):
    model = Toy()
    opt = CorrectedMomentumSGD(lr=LRS[0], momentum=0.9, nesterov=nesterov, momentum_correction=correction)
    opt.setup(model)
    w = params64(model)
    v = {n: np.zeros_like(a) for n, a in w.items()}
    lr_prev = 0.0
    for step, lr in enumerate(LRS):
        g = grads_for(model, step)
        opt.lr = lr
        opt.update()
        c = lr / lr_prev if (correction and lr_prev > 0) else 1.0
        for n in w:
            v_old = v[n]
            v[n] = 0.9 * c * v_old + lr * g[n]
            if nesterov:  # Caffe2 form, written independently of the implementation
                w[n] = w[n] - ((1 + 0.9) * v[n] - 0.9 * c * v_old)
            else:
                w[n] = w[n] - v[n]
        lr_prev = lr
        check_close(model, w)


def test_momentum_correction_matters_at_lr_drop():
    """After a x0.1 drop, corrected v-form equals u-form momentum (LR outside the buffer)."""
    model = Toy()
    opt = CorrectedMomentumSGD(lr=1.0, momentum=0.9, momentum_correction=True)
    opt.setup(model)
    w = params64(model)
    u = {n: np.zeros_like(a) for n, a in w.items()}
    for step, lr in enumerate([1.0, 1.0, 0.1, 0.1]):
        g = grads_for(model, step)
        opt.lr = lr
        opt.update()
        for n in w:
            u[n] = 0.9 * u[n] + g[n]
            w[n] = w[n] - lr * u[n]
    check_close(model, w)


def test_plain_momentum_matches_chainer():
    m1, m2 = Toy(), Toy()
    o1 = CorrectedMomentumSGD(lr=0.1, momentum=0.9, momentum_correction=False)
    o2 = chainer.optimizers.MomentumSGD(lr=0.1, momentum=0.9)
    o1.setup(m1)
    o2.setup(m2)
    for step in range(3):
        grads_for(m1, step)
        grads_for(m2, step)
        o1.update()
        o2.update()
    for (n, a), (_, b) in zip(sorted(m1.namedparams()), sorted(m2.namedparams())):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-6, err_msg=n)


def test_momentum_lr_prev_survives_serialization():
    model = Toy()
    opt = CorrectedMomentumSGD(lr=0.5)
    opt.setup(model)
    grads_for(model, 0)
    opt.update()
    state = {}
    opt.serialize(chainer.serializers.DictionarySerializer(state))
    state = {k: np.array(v, copy=True) for k, v in state.items()}  # as if written to disk
    model2 = Toy()
    model2.copyparams(model)
    opt2 = CorrectedMomentumSGD(lr=0.5)
    opt2.setup(model2)
    opt2.serialize(chainer.serializers.NpzDeserializer(state))
    for o, m in ((opt, model), (opt2, model2)):
        grads_for(m, 1)
        o.lr = 0.05
        o.update()
    for (n, a), (_, b) in zip(sorted(model.namedparams()), sorted(model2.namedparams())):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-6, err_msg=n)


def test_rmsprop_warmup_rule():
    model = Toy()
    eta_rms, mu1, mu2, eps = 3e-4, 0.9, 0.99, 1e-8
    opt = RMSpropWarmup(lr=1.0, alpha_sgd=0.0, eta_rmsprop=eta_rms, mu1=mu1, mu2=mu2, eps=eps)
    opt.setup(model)
    w = params64(model)
    m = {n: np.zeros_like(a) for n, a in w.items()}
    d = {n: np.zeros_like(a) for n, a in w.items()}
    schedule = [(6.4, 0.0092), (6.4, 0.5), (6.4, 0.9), (0.96, 1.0), (0.96, 1.0)]
    for step, (lr, a_sgd) in enumerate(schedule):
        g = grads_for(model, step)
        opt.lr, opt.alpha_sgd = lr, a_sgd
        a_rms = (1 - a_sgd) * eta_rms / lr
        assert opt.alpha_rmsprop == pytest.approx(a_rms)
        opt.update()
        for n in w:
            m[n] = mu2 * m[n] + (1 - mu2) * g[n] ** 2
            d[n] = mu1 * d[n] - (a_sgd + a_rms / (np.sqrt(m[n]) + eps)) * g[n]
            w[n] = w[n] + lr * d[n]
        check_close(model, w, rtol=1e-4, atol=1e-5)


def test_rmsprop_warmup_effective_rms_step_independent_of_lr():
    """First step with alpha_sgd = 0: step = -(1-0)*eta_rms * g/(sqrt(0.01 g^2)) = -eta_rms*10*sign(g)."""
    for lr in (0.1, 6.4):
        model = Toy()
        w0 = params64(model)
        opt = RMSpropWarmup(lr=lr, alpha_sgd=0.0, eps=0.0)
        opt.setup(model)
        g = grads_for(model, 0)
        opt.update()
        for n, p in sorted(model.namedparams()):
            np.testing.assert_allclose(p.array - w0[n], -3e-4 * 10 * np.sign(g[n]), rtol=1e-4, err_msg=n)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_rule(skip, nesterov):
    model = Toy()
    eta, wd, mom = 0.001, 5e-4, 0.9
    opt = LARS(lr=LRS[0], momentum=mom, weight_decay=wd, eta=eta, skip_bn_bias=skip, nesterov=nesterov)
    opt.setup(model)
    skipped = {n for n, p in model.namedparams() if skip and is_bn_or_bias(n, p)}
    assert skipped == ({"/b", "/gamma"} if skip else set())
    w = params64(model)
    v = {n: np.zeros_like(a) for n, a in w.items()}
    for step, lr in enumerate(LRS):
        g = grads_for(model, step)
        if step == 2:
            model.W.grad[...] = 0  # ||g|| = 0: ratio falls back to 1
            g["/W"][...] = 0
        opt.lr = lr
        opt.update()
        if step == 0:
            assert model.zero.update_rule.last_ratio == 1.0  # ||w|| = 0: ratio falls back to 1
        for n in w:
            if n in skipped:
                upd = lr * g[n]
            else:
                wn, gn = np.linalg.norm(w[n]), np.linalg.norm(g[n])
                ratio = eta * wn / (gn + wd * wn) if (wn > 0 and gn > 0) else 1.0
                upd = lr * ratio * (g[n] + wd * w[n])
            v[n] = mom * v[n] + upd
            w[n] = w[n] - (mom * v[n] + upd if nesterov else v[n])
        check_close(model, w)


def test_lars_ratio_value():
    """One step by hand: ||w|| = 5, ||g|| = 1, wd 0.01 -> ratio = 0.001*5/(1+0.05)."""
    p = chainer.Parameter(np.array([[3.0, 4.0]], np.float32))
    link = chainer.Link()
    with link.init_scope():
        link.W = p
    opt = LARS(lr=1.0, momentum=0.0, weight_decay=0.01)
    opt.setup(link)
    p.grad = np.array([[0.6, 0.8]], np.float32)
    opt.update()
    ratio = 0.001 * 5 / 1.05
    assert float(p.update_rule.last_ratio) == pytest.approx(ratio, rel=1e-6)
    expect = np.array([3.0, 4.0]) - ratio * (np.array([0.6, 0.8]) + 0.01 * np.array([3.0, 4.0]))
    np.testing.assert_allclose(p.array[0], expect, rtol=1e-6)


def test_weight_decay_excludes_bn_and_bias():
    model = Toy()
    opt = chainer.optimizers.SGD(lr=0.1)
    opt.setup(model)
    decayed = apply_weight_decay(opt, 0.01)
    assert decayed == ["/W", "/zero"]
    w = params64(model)
    g = grads_for(model, 0)
    opt.update()
    for n, p in sorted(model.namedparams()):
        expect = w[n] - 0.1 * (g[n] + (0.01 * w[n] if n in decayed else 0.0))
        np.testing.assert_allclose(p.array, expect, rtol=1e-6, atol=1e-7, err_msg=n)


def test_weight_decay_needs_setup():
    with pytest.raises(ValueError, match="setup"):
        apply_weight_decay(chainer.optimizers.SGD(), 1e-4)
