"""recipe: custom (explicit optimizer + schedule) against hand-computed learning rates."""

import math

import numpy as np
import pytest

from hpcsgd.errors import ConfigError
from hpcsgd.schedules.custom import build_custom_recipe


def test_cosine_with_warmup_momentum_sgd():
    import chainer.links as L

    model = L.Linear(3, 2)
    r = build_custom_recipe(model, {"name": "momentum_sgd", "momentum": 0.9, "weight_decay": 1e-3},
                            {"type": "cosine", "lr": 0.4, "warmup_epochs": 1.0, "warmup_start": 0.1},
                            global_batch=256, epochs=5, iters_per_epoch=10)
    assert r.hyperparams(0.0)["lr"] == pytest.approx(0.1)
    assert r.hyperparams(0.5)["lr"] == pytest.approx(0.25)           # halfway through the warm-up
    assert r.hyperparams(3.0)["lr"] == pytest.approx(0.2)            # cos(pi/2): half of the peak
    assert r.hyperparams(5.0)["lr"] == pytest.approx(0.0, abs=1e-12)
    r.on_iteration(3.0)
    assert r.optimizer.lr == pytest.approx(0.2)
    # weight decay on W, not on the bias (BN/bias excluded by default): a zero-gradient step
    w0, b0 = model.W.array.copy(), np.full_like(model.b.array, 0.5)
    model.b.array[...] = b0
    model.W.grad, model.b.grad = np.zeros_like(w0), np.zeros_like(b0)
    r.optimizer.update()
    np.testing.assert_allclose(model.W.array, w0 * (1 - 0.2 * 1e-3), rtol=1e-6)
    np.testing.assert_array_equal(model.b.array, b0)


def test_step_and_default_lr_and_adam_alpha():
    r = build_custom_recipe(None, {"name": "sgd"}, {"type": "step", "milestones": [2, 4], "gamma": 0.5},
                            global_batch=512, epochs=6, iters_per_epoch=1)
    assert [r.hyperparams(e)["lr"] for e in (0, 2, 5)] == pytest.approx([0.2, 0.1, 0.05])  # 0.1 x 512/256
    a = build_custom_recipe(None, {"name": "adam"}, {"type": "poly", "lr": 1e-3, "power": 2.0},
                            global_batch=32, epochs=4, iters_per_epoch=1)
    assert set(a.hyperparams(1.0)) == {"alpha"}
    assert a.hyperparams(2.0)["alpha"] == pytest.approx(1e-3 * (1 - 0.5) ** 2)
    a.on_iteration(2.0)
    assert math.isclose(a.optimizer.alpha, 2.5e-4)


@pytest.mark.parametrize("opt, sched, key", [
    ({"name": "adamw"}, {}, "'optimizer.name'"),
    ({"name": "sgd", "momentum": 0.9}, {}, "'optimizer'"),          # SGD takes no momentum
    ({}, {"type": "linear"}, "'schedule.type'"),
    ({}, {"lr": 0.1, "warmup": 1}, "'schedule'"),
])
def test_bad_custom_recipe_names_the_key(opt, sched, key):
    with pytest.raises(ConfigError) as ei:
        build_custom_recipe(None, opt, sched, 256, 1, 1)
    assert key in str(ei.value), str(ei.value)


def test_config_keys_belong_to_custom_only():
    from hpcsgd.train import config as C

    with pytest.raises(ConfigError, match="'optimizer' is only used with recipe: custom"):
        C.resolve(C.merge({"recipe": "goyal", "optimizer": {"name": "adam"}}), 1, check_paths=False)
    with pytest.raises(ConfigError, match="'recipe_options' does not apply"):
        C.resolve(C.merge({"recipe": "custom", "recipe_options": {"lr": 1}}), 1, check_paths=False)
    assert C.resolve(C.merge({"recipe": "custom"}), 1, check_paths=False)["recipe"] == "custom"
