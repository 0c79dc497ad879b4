"""Optimizers and recipes for large-minibatch training.

* :func:`create_multi_node_optimizer` (ChainerMN semantics, plus non-finite skip,
  gradient accumulation, double buffering): :mod:`hpcsgd.optim.multi_node`.
* :class:`LARS` (You et al.), :class:`RMSpropWarmup` (Akiba et al.),
  :class:`CorrectedMomentumSGD` (Goyal et al.), all Chainer ``GradientMethod``s.
* :func:`apply_weight_decay` (BN/bias excluded by default).
* :func:`build_recipe` ('goyal', 'akiba', 'lars', 'sgd'): re-exported from :mod:`hpcsgd.schedules.recipes`.
"""

from hpcsgd.optim.lars import LARS, LARSRule
from hpcsgd.optim.momentum import CorrectedMomentumSGD, CorrectedMomentumSGDRule
from hpcsgd.optim.multi_node import (
    DoubleBufferingOptimizer,
    MultiNodeOptimizer,
    create_multi_node_optimizer,
)
from hpcsgd.optim.rmsprop_warmup import RMSpropWarmup, RMSpropWarmupRule
from hpcsgd.optim.weight_decay import apply_weight_decay, is_bn_or_bias
from hpcsgd.schedules.recipes import RECIPES, Recipe, build_recipe

__all__ = [
    "LARS", "LARSRule", "CorrectedMomentumSGD", "CorrectedMomentumSGDRule", "RMSpropWarmup",
    "RMSpropWarmupRule", "MultiNodeOptimizer", "DoubleBufferingOptimizer", "create_multi_node_optimizer",
    "Recipe", "RECIPES", "build_recipe", "apply_weight_decay", "is_bn_or_bias",
]
