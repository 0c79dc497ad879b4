"""``recipe: custom``: an explicit optimizer and learning-rate schedule from the config.

    recipe: custom
    optimizer: {name: momentum_sgd, momentum: 0.9, nesterov: true, weight_decay: 5e-5}
    schedule: {type: cosine, lr: 0.4, warmup_epochs: 0.5, warmup_start: 0.0}

Optimizers: ``momentum_sgd`` (hpcsgd's CorrectedMomentumSGD: LR outside the
velocity, momentum correction), ``sgd``, ``rmsprop``, ``adam`` (Chainer's; the
schedule drives Adam's ``alpha``), ``lars`` (hpcsgd's LARS). ``weight_decay``
(default 1e-4) skips BN parameters and biases unless ``exclude_bn_bias: false``
(LARS applies its own decay inside the trust ratio).

Schedules (:mod:`hpcsgd.schedules.lr`, fractional epoch, absolute epochs): ``constant``,
``step`` (``milestones``, ``gamma``), ``cosine`` and ``poly`` (``power``,
``end_lr``), each with an optional linear warm-up (``warmup_epochs`` from
``warmup_start``). ``lr`` defaults to Goyal's linear scaling, 0.1 x global batch / 256.
"""

from __future__ import annotations

from hpcsgd.errors import ConfigError
from hpcsgd.schedules import lr as S
from hpcsgd.schedules.recipes import Recipe

OPTIMIZERS = ("momentum_sgd", "sgd", "rmsprop", "adam", "lars")
SCHEDULES = ("constant", "step", "cosine", "poly")
_SCHEDULE_KEYS = {"type", "lr", "warmup_epochs", "warmup_start", "milestones", "gamma", "power", "end_lr"}


def _optimizer(spec: dict):
    import chainer

    from hpcsgd.optim.lars import LARS
    from hpcsgd.optim.momentum import CorrectedMomentumSGD

    kw = {k: v for k, v in spec.items() if k not in ("name", "weight_decay", "exclude_bn_bias")}
    name = spec.get("name", "momentum_sgd")
    classes = {"momentum_sgd": CorrectedMomentumSGD, "sgd": chainer.optimizers.SGD,
               "rmsprop": chainer.optimizers.RMSprop, "adam": chainer.optimizers.Adam, "lars": LARS}
    if name not in classes:
        raise ConfigError(f"config key 'optimizer.name'={name!r} must be one of {list(OPTIMIZERS)}")
    if name == "lars":
        kw["weight_decay"] = spec.get("weight_decay", 1e-4)
    try:
        return name, classes[name](**kw)
    except TypeError as e:
        raise ConfigError(f"config key 'optimizer': {name}: {e}") from e


def _schedule(spec: dict, global_batch: int, epochs: float):
    unknown = sorted(set(spec) - _SCHEDULE_KEYS)
    if unknown:
        raise ConfigError(f"config key 'schedule': unknown setting(s) {unknown}; "
                          f"allowed: {sorted(_SCHEDULE_KEYS)}")
    kind = spec.get("type", "constant")
    if kind not in SCHEDULES:
        raise ConfigError(f"config key 'schedule.type'={kind!r} must be one of {list(SCHEDULES)}")
    lr = float(spec.get("lr") or S.linear_scaling_lr(global_batch))
    warm, start = float(spec.get("warmup_epochs", 0.0)), float(spec.get("warmup_start", 0.0))
    end = float(spec.get("end_lr", 0.0))
    if kind == "poly":
        return lambda e: S.poly_lr(e, lr, epochs, spec.get("power", 2.0), warm, start, end)
    if kind == "cosine":
        return lambda e: S.cosine_lr(e, lr, epochs, warm, start, end)
    if kind == "step":
        milestones, gamma = tuple(spec.get("milestones", ())), float(spec.get("gamma", 0.1))
        decay = lambda e: S.step_decay(e, lr, milestones, gamma)
    else:
        decay = lambda e: lr
    return lambda e: S.linear_warmup(e, start, lr, warm) if e < warm else decay(e)


def build_custom_recipe(model, optimizer: dict, schedule: dict, global_batch: int, epochs: float,
                        iters_per_epoch: int):
    """A :class:`~hpcsgd.schedules.recipes.Recipe` from the ``optimizer`` and ``schedule`` config keys."""
    from hpcsgd.optim.weight_decay import apply_weight_decay, is_bn_or_bias

    name, opt = _optimizer(optimizer)
    lr_of = _schedule(schedule, global_batch, epochs)
    key = "alpha" if name == "adam" else "lr"
    recipe = Recipe("custom", opt, global_batch, epochs, iters_per_epoch,
                    {"optimizer": dict(optimizer), "schedule": dict(schedule)}, lambda e: {key: lr_of(e)})
    recipe.on_iteration(0.0)
    if model is not None:
        opt.setup(model)
        rate = optimizer.get("weight_decay", 1e-4)
        if name != "lars" and rate:
            apply_weight_decay(opt, rate, is_bn_or_bias if optimizer.get("exclude_bn_bias", True) else None)
    return recipe
