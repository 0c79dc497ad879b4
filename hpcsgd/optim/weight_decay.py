"""L2 weight decay that leaves BN and bias parameters alone (Goyal et al.; Jia et al.).

``apply_weight_decay(optimizer, rate)`` adds Chainer's
:class:`chainer.optimizer_hooks.WeightDecay` (``g += rate * w`` before the
update) to the update rule of every parameter that is *not* excluded, instead
of to the optimizer as a whole. By default a parameter is excluded when
:func:`is_bn_or_bias` says so.

A parameter counts as "BN or bias" when its name is one of ``b``, ``bias``,
``beta``, ``gamma`` (Chainer's names for biases and BN scale/shift), or when
it is a vector (``ndim <= 1``): convolution and linear weights are the only
parameters of rank >= 2 in every hpcsgd model.
"""

from __future__ import annotations

from typing import Callable

import chainer
from chainer.optimizer_hooks import WeightDecay

BN_OR_BIAS_NAMES = frozenset({"b", "bias", "beta", "gamma"})


def is_bn_or_bias(path: str, param: chainer.Parameter) -> bool:
    """True for biases and BN gamma/beta (by name, or any parameter with ``ndim <= 1``)."""
    name = path.rsplit("/", 1)[-1]
    if name in BN_OR_BIAS_NAMES:
        return True
    return param.array is not None and param.array.ndim <= 1


def apply_weight_decay(optimizer: chainer.Optimizer, rate: float,
                       exclude: Callable[[str, chainer.Parameter], bool] | None = is_bn_or_bias) -> list[str]:
    """Add weight decay ``rate`` to the parameters of ``optimizer.target`` not excluded.

    Must be called after ``optimizer.setup(model)``. Returns the paths of the
    parameters that got weight decay (sorted), so callers can log them.
    ``exclude=None`` decays every parameter (plain Chainer behaviour).
    """
    if getattr(optimizer, "target", None) is None:
        raise ValueError("apply_weight_decay: call optimizer.setup(model) first")
    if rate < 0:
        raise ValueError(f"weight decay rate must be >= 0, got {rate}")
    decayed = []
    if rate == 0:
        return decayed
    hook = WeightDecay(rate)
    for path, param in sorted(optimizer.target.namedparams()):
        if exclude is not None and exclude(path, param):
            continue
        param.update_rule.add_hook(hook, name="WeightDecay")
        decayed.append(path)
    return decayed
