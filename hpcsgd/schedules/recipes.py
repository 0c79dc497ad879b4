"""Training recipes: optimizer + per-iteration hyperparameter schedule, by paper.

``build_recipe(name, model, global_batch, epochs, iters_per_epoch, **overrides)``:

* ``'goyal'``: CorrectedMomentumSGD (Nesterov, m = 0.9, momentum correction),
  weight decay 1e-4 except BN/bias; LR 0.1 * B/256 reached by a per-iteration
  linear warm-up from 0.1 over 5 epochs, x0.1 at 30/60/80.
* ``'akiba'``: RMSpropWarmup (mu1 0.9, mu2 0.99, eps 1e-8, eta_RMSprop 3e-4),
  alpha_SGD(e) with beta_c = 10, beta_p = 5 (ELU-consistent, clamped), slow-start
  LR 0.5/0.075/0.01/0.001 x (0.1 * B/256) from epochs 0/40/70/85; weight decay
  1e-4 except BN/bias (UNCONFIRMED: the paper's value and exclusion are unknown;
  Akiba "mainly follows Goyal", whose values these are).
* ``'lars'``: LARS (eta 0.001, m 0.9, weight decay 1e-4 inside the trust ratio,
  BN/bias skipped), poly power 2 with linear warm-up from 0; peak LR and
  warm-up epochs from the TF TPU reference table (25/5 up to 16K, 34/12 up
  to 32K, 41/16 above; papers.md sec. 4(a)) unless ``lr``/``warmup_epochs``
  are given (Y3 used lr 2.9 at 32K with its own code: UNCONFIRMED mapping).
* ``'sgd'``: plain linear scaling, no warm-up: momentum SGD (m 0.9, correction
  on, no Nesterov), LR 0.1 * B/256, x0.1 at 30/60/80, weight decay 1e-4
  except BN/bias.

Epoch scaling rule (for short small-data runs): every epoch-valued setting
(milestones, warm-up length, beta_c, beta_p), default or override, is given
in units of a ``reference_epochs`` = 90 epoch run and multiplied by
``epochs / reference_epochs``. At 90 epochs the paper values are used as they
are; a 9-epoch run puts Goyal's decays at 3/6/8 and the warm-up at 0.5 epochs.
``scale_epochs=False`` uses the values as absolute epochs.

For 'akiba' the common ``momentum`` setting is mu1 (the momentum of delta).

Overrides: any key of the recipe's settings (``Recipe.settings``); an unknown
key raises ConfigError naming the allowed ones. ``decay='cosine'`` replaces the
step decay of 'goyal' and 'sgd' by a cosine to 0 at the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from hpcsgd.errors import ConfigError
from hpcsgd.schedules import lr as S

RECIPES = ("goyal", "akiba", "lars", "sgd")
REFERENCE_EPOCHS = 90.0

_COMMON = {"lr": None, "momentum": 0.9, "weight_decay": 1e-4, "exclude_bn_bias": True,
           "scale_epochs": True, "reference_epochs": REFERENCE_EPOCHS}
_DEFAULTS = {
    "goyal": {"warmup_epochs": 5.0, "warmup_start": 0.1, "milestones": S.GOYAL_MILESTONES, "gamma": 0.1,
              "nesterov": True, "momentum_correction": True, "decay": "step"},
    "sgd": {"milestones": S.GOYAL_MILESTONES, "gamma": 0.1, "nesterov": False, "momentum_correction": True,
            "decay": "step"},
    "akiba": {"milestones": S.AKIBA_MILESTONES, "factors": S.AKIBA_FACTORS, "alpha_center": 10.0,
              "alpha_period": 5.0, "alpha_form": "elu", "eta_rmsprop": 3e-4, "mu2": 0.99, "eps": 1e-8},
    "lars": {"warmup_epochs": None, "warmup_start": 0.0, "power": 2.0, "end_lr": 0.0, "eta": 0.001,
             "skip_bn_bias": True, "nesterov": False},
}
_EPOCH_KEYS = ("milestones", "warmup_epochs", "alpha_center", "alpha_period")


@dataclass
class Recipe:
    """An optimizer (set up on the model, not multi-node wrapped) and its hyperparameter schedule."""

    name: str
    optimizer: object
    global_batch: int
    epochs: float
    iters_per_epoch: int
    settings: dict
    schedule: Callable[[float], dict] = field(repr=False)

    def hyperparams(self, epoch: float) -> dict:
        """Hyperparameters for the update at fractional ``epoch`` (e.g. {'lr':.., 'alpha_sgd':..})."""
        return self.schedule(epoch)

    def on_iteration(self, epoch: float) -> dict:
        """Set the hyperparameters for the coming update on the optimizer; returns them."""
        hp = self.hyperparams(epoch)
        for key, value in hp.items():
            if key != "alpha_rmsprop":  # derived inside RMSpropWarmup from lr and alpha_sgd
                setattr(self.optimizer, key, value)
        return hp

    def epoch_of(self, iteration: int) -> float:
        return S.epoch_at(iteration, self.iters_per_epoch)


def _settings(name: str, global_batch: int, epochs: float, overrides: dict) -> dict:
    allowed = dict(_COMMON, **_DEFAULTS[name])
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(f"recipe {name!r}: unknown setting(s) {unknown}; allowed: {sorted(allowed)}")
    st = dict(allowed, **overrides)
    if name == "lars":
        peak, warm = S.lars_reference_peak(global_batch)
        st["lr"] = peak if st["lr"] is None else st["lr"]
        st["warmup_epochs"] = warm if st["warmup_epochs"] is None else st["warmup_epochs"]
    elif st["lr"] is None:
        st["lr"] = S.linear_scaling_lr(global_batch)
    factor = epochs / float(st["reference_epochs"]) if st["scale_epochs"] else 1.0
    st["epoch_scale"] = factor
    for key in _EPOCH_KEYS:
        if key in st:
            st[key] = tuple(m * factor for m in st[key]) if key == "milestones" else st[key] * factor
    return st


def _decay(st: dict, epochs: float) -> Callable[[float], float]:
    if st["decay"] == "step":
        return lambda e: S.step_decay(e, st["lr"], st["milestones"], st["gamma"])
    if st["decay"] == "cosine":
        return lambda e: S.cosine_lr(e, st["lr"], epochs)
    raise ConfigError(f"decay must be 'step' or 'cosine', got {st['decay']!r}")


def _build(name: str, st: dict, epochs: float):
    """(optimizer, schedule(epoch) -> dict) for recipe ``name`` with settings ``st``.

    The optimizers are imported here, not at module level: hpcsgd.optim re-exports
    :func:`build_recipe`, so a module-level import would be circular.
    """
    from hpcsgd.optim.lars import LARS
    from hpcsgd.optim.momentum import CorrectedMomentumSGD
    from hpcsgd.optim.rmsprop_warmup import RMSpropWarmup, alpha_rmsprop

    if name == "goyal":
        opt = CorrectedMomentumSGD(st["lr"], st["momentum"], st["nesterov"], st["momentum_correction"])
        decay = _decay(st, epochs)
        start = min(st["warmup_start"], st["lr"])

        def schedule(e):
            if e < st["warmup_epochs"]:
                return {"lr": S.linear_warmup(e, start, st["lr"], st["warmup_epochs"])}
            return {"lr": decay(e)}
    elif name == "sgd":
        opt = CorrectedMomentumSGD(st["lr"], st["momentum"], st["nesterov"], st["momentum_correction"])
        decay = _decay(st, epochs)

        def schedule(e):
            return {"lr": decay(e)}
    elif name == "akiba":
        opt = RMSpropWarmup(st["lr"], 0.0, st["eta_rmsprop"], st["momentum"], st["mu2"], st["eps"])

        def schedule(e):
            lr = S.akiba_lr(e, st["lr"], st["milestones"], st["factors"])
            a = S.alpha_sgd(e, st["alpha_center"], st["alpha_period"], st["alpha_form"])
            return {"lr": lr, "alpha_sgd": a, "alpha_rmsprop": alpha_rmsprop(a, lr, st["eta_rmsprop"])}
    else:  # lars
        opt = LARS(st["lr"], st["momentum"], st["weight_decay"], st["eta"], skip_bn_bias=st["skip_bn_bias"],
                   nesterov=st["nesterov"])

        def schedule(e):
            return {"lr": S.poly_lr(e, st["lr"], epochs, st["power"], st["warmup_epochs"], st["warmup_start"],
                                    st["end_lr"])}
    return opt, schedule


def build_recipe(name: str, model, global_batch: int, epochs: float, iters_per_epoch: int,
                 **overrides) -> Recipe:
    """Build recipe ``name`` for ``model`` (see the module docstring).

    ``model`` may be None to inspect the schedule only (``hpcsgd schedule``);
    then the optimizer is not set up. The optimizer starts with the
    hyperparameters of epoch 0.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {RECIPES}")
    if global_batch < 1 or epochs <= 0 or iters_per_epoch < 1:
        raise ConfigError(f"recipe {name!r}: need global_batch >= 1, epochs > 0, iters_per_epoch >= 1 "
                          f"(got {global_batch}, {epochs}, {iters_per_epoch})")
    st = _settings(name, global_batch, epochs, overrides)
    opt, schedule = _build(name, st, epochs)
    recipe = Recipe(name, opt, global_batch, epochs, iters_per_epoch, st, schedule)
    recipe.on_iteration(0.0)
    if model is not None:
        from hpcsgd.optim.weight_decay import apply_weight_decay, is_bn_or_bias

        opt.setup(model)
        if name != "lars":
            apply_weight_decay(opt, st["weight_decay"], is_bn_or_bias if st["exclude_bn_bias"] else None)
    return recipe
