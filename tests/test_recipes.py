"""build_recipe: paper values at 90 epochs, the epoch-scaling rule, optimizer wiring."""

import chainer
import numpy as np
import pytest

from hpcsgd.errors import ConfigError
from hpcsgd.models import build_model
from hpcsgd.optim import LARS, CorrectedMomentumSGD, RMSpropWarmup, build_recipe


def tiny():
    return build_model("resnet_small", 10, in_channels=1, depth=8, width=4)


def test_akiba_recipe_32k():
    r = build_recipe("akiba", tiny(), 32768, 90, 39)
    assert isinstance(r.optimizer, RMSpropWarmup)
    hp = r.hyperparams(0.0)
    assert hp["lr"] == pytest.approx(6.4) and hp["alpha_sgd"] == pytest.approx(0.00916, abs=1e-4)
    assert hp["alpha_rmsprop"] == pytest.approx((1 - hp["alpha_sgd"]) * 3e-4 / 6.4)
    assert r.hyperparams(40.0)["lr"] == pytest.approx(0.96)
    # per iteration: fractional epoch 10.5 -> alpha 0.6
    r.on_iteration(r.epoch_of(int(10.5 * 39)))
    assert r.optimizer.alpha_sgd == pytest.approx(0.5 + (409 / 39 - 10) / 5)
    assert r.optimizer.lr == pytest.approx(6.4)


def test_goyal_recipe_8k_and_weight_decay_exclusion():
    model = tiny()
    r = build_recipe("goyal", model, 8192, 90, 156)
    opt = r.optimizer
    assert isinstance(opt, CorrectedMomentumSGD) and opt.nesterov and opt.momentum_correction
    assert r.hyperparams(0)["lr"] == pytest.approx(0.1) and r.hyperparams(5)["lr"] == pytest.approx(3.2)
    assert r.hyperparams(80)["lr"] == pytest.approx(0.0032)
    # behaviour: with zero gradients only the weight decay moves a parameter
    before = {n: p.array.copy() for n, p in model.namedparams()}
    for p in model.params():
        p.grad = np.zeros_like(p.array)
    opt.update()
    for n, p in model.namedparams():
        moved = not np.array_equal(before[n], p.array)
        assert moved == (p.ndim > 1), n


def test_lars_recipe_reference_table_and_override():
    r = build_recipe("lars", tiny(), 32768, 90, 39)
    assert isinstance(r.optimizer, LARS) and r.optimizer.eta == 0.001
    assert r.settings["warmup_epochs"] == 12 and r.hyperparams(12)["lr"] == pytest.approx(34.0)
    r2 = build_recipe("lars", None, 32768, 90, 39, lr=2.9, warmup_epochs=5)
    assert r2.hyperparams(5)["lr"] == pytest.approx(2.9) and r2.hyperparams(90)["lr"] == pytest.approx(0)


def test_epoch_scaling_rule():
    r = build_recipe("goyal", None, 1024, 9, 10)
    assert r.settings["milestones"] == pytest.approx((3.0, 6.0, 8.0))
    assert r.settings["warmup_epochs"] == pytest.approx(0.5)
    assert r.hyperparams(0.5)["lr"] == pytest.approx(0.4) and r.hyperparams(3.0)["lr"] == pytest.approx(0.04)
    a = build_recipe("akiba", None, 32768, 9, 10)
    assert a.hyperparams(1.0)["alpha_sgd"] == pytest.approx(0.5)
    assert a.hyperparams(4.0)["lr"] == pytest.approx(0.96)
    raw = build_recipe("goyal", None, 1024, 9, 10, scale_epochs=False)
    assert raw.settings["milestones"] == (30.0, 60.0, 80.0)


def test_sgd_cosine_and_bad_input():
    r = build_recipe("sgd", None, 512, 10, 5, decay="cosine")
    assert r.hyperparams(0)["lr"] == pytest.approx(0.2) and r.hyperparams(5)["lr"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="warmpu"):
        build_recipe("goyal", None, 256, 90, 5, warmpu_epochs=3)
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_recipe("adam", None, 256, 90, 5)


def test_recipe_trains_a_step():
    model = tiny()
    r = build_recipe("akiba", model, 64, 2, 4)
    x = np.random.RandomState(0).randn(4, 1, 28, 28).astype(np.float32)
    t = np.array([0, 1, 2, 3], np.int32)
    before = model.fc.W.array.copy()
    r.on_iteration(0.0)
    r.optimizer.update(lambda: chainer.functions.softmax_cross_entropy(model(x), t))
    assert not np.allclose(before, model.fc.W.array)
