"""Models for hpcsgd: ImageNet ResNets, CIFAR-style ResNets, AlexNet-BN.

``build_model(name, n_classes, in_channels=3, bn_mode='running', zero_init_residual=False, **kw)``
returns a ``chainer.Chain`` whose ``__call__(x)`` gives logits. Names:

* ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``: :class:`~hpcsgd.models.resnet.ResNet`.
* ``resnet_small``: :class:`~hpcsgd.models.resnet_small.SmallResNet` (kw ``depth`` 6n+2, ``width``).
* ``alexnet_bn``: :class:`~hpcsgd.models.alexnet.AlexNetBN` (kw ``input_size``, ``fc_width``, ``dropout``).

Extra BN keywords for every model: ``comm`` (required for ``bn_mode='sync'``),
``decay``, ``eps``, ``var_combine``. ``prepare_for_eval(model, comm, batches=None)``
makes BN statistics ready before evaluation (see :mod:`hpcsgd.models.batchnorm`).
"""

from __future__ import annotations

import chainer

from hpcsgd.errors import ConfigError
from hpcsgd.models.alexnet import AlexNetBN
from hpcsgd.models.batchnorm import MODES as BN_MODES
from hpcsgd.models.batchnorm import BatchNorm
from hpcsgd.models.eval_stats import bn_links, prepare_for_eval, start_step
from hpcsgd.models.resnet import ResNet
from hpcsgd.models.resnet_small import SmallResNet

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet_small", "alexnet_bn")


def build_model(name: str, n_classes: int, in_channels: int = 3, bn_mode: str = "running",
                zero_init_residual: bool = False, **kw) -> chainer.Chain:
    """Build model ``name`` (see the module docstring); bad names or options raise ConfigError."""
    if bn_mode not in BN_MODES:
        raise ConfigError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if n_classes < 1:
        raise ConfigError(f"n_classes must be >= 1, got {n_classes}")
    common = dict(n_classes=n_classes, in_channels=in_channels, bn_mode=bn_mode,
                  zero_init_residual=zero_init_residual)
    try:
        if name.startswith("resnet") and name[6:].isdigit():
            return ResNet(depth=int(name[6:]), **common, **kw)
        if name == "resnet_small":
            return SmallResNet(**common, **kw)
        if name == "alexnet_bn":
            return AlexNetBN(**common, **kw)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model {name!r}: {e}") from e
    raise ConfigError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


def count_params(model: chainer.Link) -> int:
    """Number of trainable scalars (BN running statistics excluded)."""
    return int(sum(p.size for p in model.params()))


__all__ = ["build_model", "prepare_for_eval", "start_step", "count_params", "bn_links", "BatchNorm",
           "BN_MODES", "ResNet", "SmallResNet", "AlexNetBN", "MODEL_NAMES"]
