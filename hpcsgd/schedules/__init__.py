"""Learning-rate schedules and training recipes: the one home of "what the LR is at epoch e".

Modules, from formula to command line:

* :mod:`~hpcsgd.schedules.lr`: pure functions of the fractional epoch (linear
  scaling, warm-up, step, cosine, poly, Akiba's slow start and alpha_SGD).
* :mod:`~hpcsgd.schedules.recipes`: the papers' recipes (``goyal``, ``akiba``,
  ``lars``, ``sgd``): optimizer + per-iteration hyperparameters, and the
  :class:`Recipe` every recipe is.
* :mod:`~hpcsgd.schedules.custom`: ``recipe: custom``, an optimizer and a
  schedule spelled out in the config.
* :mod:`~hpcsgd.schedules.cli`: ``hpcsgd schedule`` (print or plot a recipe).

:func:`make_recipe` builds whichever one a training config names.
``from hpcsgd import schedules as S; S.goyal_lr(...)`` keeps working: the
formulas are re-exported here. Importing this package does not import Chainer
or the optimizers; building a recipe does.
"""

from __future__ import annotations

from hpcsgd.schedules.custom import OPTIMIZERS, SCHEDULES, build_custom_recipe
from hpcsgd.schedules.lr import (
    AKIBA_FACTORS,
    AKIBA_MILESTONES,
    GOYAL_MILESTONES,
    akiba_lr,
    alpha_sgd,
    cosine_lr,
    epoch_at,
    goyal_lr,
    lars_reference_peak,
    linear_scaling_lr,
    linear_warmup,
    poly_lr,
    step_decay,
)
from hpcsgd.schedules.recipes import RECIPES, REFERENCE_EPOCHS, Recipe, build_recipe


def make_recipe(cfg: dict, model, iters_per_epoch: int) -> Recipe:
    """The recipe a resolved training config names: a paper's (``recipe_options``) or ``custom``.

    ``model`` may be None to check the settings or inspect the schedule only.
    """
    if cfg["recipe"] == "custom":
        return build_custom_recipe(model, cfg["optimizer"], cfg["schedule"], cfg["global_batch"],
                                   cfg["epochs"], iters_per_epoch)
    return build_recipe(cfg["recipe"], model, cfg["global_batch"], cfg["epochs"], iters_per_epoch,
                        **cfg["recipe_options"])


__all__ = ["AKIBA_FACTORS", "AKIBA_MILESTONES", "GOYAL_MILESTONES", "OPTIMIZERS", "RECIPES",
           "REFERENCE_EPOCHS", "Recipe", "SCHEDULES", "akiba_lr", "alpha_sgd", "build_custom_recipe",
           "build_recipe", "cosine_lr", "epoch_at", "goyal_lr", "lars_reference_peak", "linear_scaling_lr",
           "linear_warmup", "make_recipe", "poly_lr", "step_decay"]
