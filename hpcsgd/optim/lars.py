"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg; Algorithm 1).

Per parameter array ("layer": weight and bias are separate layers, Y3
Table 4), with global LR ``lr`` (gamma_t, set by the poly schedule), momentum
``m``, weight decay ``beta`` and trust coefficient ``eta`` (0.001)::

    ratio  = eta * ||w|| / (||g|| + beta * ||w|| + eps)   if ||w|| > 0 and ||g|| > 0
           = 1                                            otherwise (TF reference)
    v     <- m * v + lr * ratio * (g + beta * w)          # wd inside, LR inside the buffer
    w     <- w - v                                        (nesterov: w - (m v + lr ratio (g + beta w)))

Parameters on the skip list (``skip_bn_bias=True``, the TF reference's
``skip_list=['batch_normalization', 'bias']``; see
:func:`hpcsgd.optim.weight_decay.is_bn_or_bias`) get neither the trust ratio
nor weight decay: ``v <- m v + lr g``, exactly as the TF code does. Default:
``skip_bn_bias=True`` (the reference code; the tech report scales "each
learnable parameter", so ``False`` is the paper's literal form).

As in Algorithm 1 (papers.md sec. 4(d) pitfall 2) there is no momentum
correction when ``lr`` changes: the LR is inside the buffer on purpose.
Weight decay belongs to this optimizer; do not also add a WeightDecay hook.
``eps`` defaults to 0 (TF reference).
"""

from __future__ import annotations

from chainer import optimizer

from hpcsgd.optim.base import XpUpdateRule, as_scalar
from hpcsgd.optim.weight_decay import is_bn_or_bias


class LARSRule(XpUpdateRule):
    """Update rule of :class:`LARS`; state ``v``. ``skip`` is set per parameter by ``LARS.setup``."""

    def __init__(self, parent_hyperparam=None):
        super().__init__(parent_hyperparam)
        self.skip = False
        self.last_ratio = None  # trust ratio of the last step (0-d array), for logging

    def init_state(self, param):
        xp = param.device.xp
        self.state["v"] = xp.zeros_like(param.array)

    def step(self, xp, param, grad):
        hp = self.hyperparam
        w = param.array
        dt = w.dtype
        lr = as_scalar(hp.lr, dt)
        m = as_scalar(hp.momentum, dt)
        v = self.state["v"]
        if self.skip:
            update = lr * grad
        else:
            wd = as_scalar(hp.weight_decay, dt)
            w_norm = xp.sqrt(xp.sum(w.astype(xp.float64) ** 2))
            g_norm = xp.sqrt(xp.sum(grad.astype(xp.float64) ** 2))
            denom = g_norm + float(hp.weight_decay) * w_norm + float(hp.eps)
            ok = (w_norm > 0) & (g_norm > 0)
            ratio = xp.where(ok, float(hp.eta) * w_norm / xp.where(ok, denom, 1.0), 1.0).astype(dt)
            self.last_ratio = ratio
            update = (lr * ratio) * (grad + wd * w)
        v *= m
        v += update
        if hp.nesterov:
            w -= m * v + update
        else:
            w -= v


class LARS(optimizer.GradientMethod):
    """LARS with momentum (You et al. Algorithm 1; TF reference behaviour for the skip list).

    Args:
        lr: global LR gamma_t (poly schedule).
        momentum: m (0.9).
        weight_decay: beta, applied inside the trust ratio and the update (1e-4 ResNet, 5e-4 AlexNet).
        eta: trust coefficient (0.001).
        eps: added to the ratio's denominator (0).
        skip_bn_bias: no trust ratio and no weight decay for BN and bias parameters (True).
        nesterov: Nesterov variant (TF ``use_nesterov``); False in the paper.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 1e-4,
                 eta: float = 0.001, eps: float = 0.0, skip_bn_bias: bool = True, nesterov: bool = False):
        super().__init__()
        self.hyperparam.lr = lr
        self.hyperparam.momentum = momentum
        self.hyperparam.weight_decay = weight_decay
        self.hyperparam.eta = eta
        self.hyperparam.eps = eps
        self.hyperparam.nesterov = nesterov
        self.skip_bn_bias = skip_bn_bias

    lr = optimizer.HyperparameterProxy("lr")
    momentum = optimizer.HyperparameterProxy("momentum")
    weight_decay = optimizer.HyperparameterProxy("weight_decay")
    eta = optimizer.HyperparameterProxy("eta")
    eps = optimizer.HyperparameterProxy("eps")
    nesterov = optimizer.HyperparameterProxy("nesterov")

    def create_update_rule(self):
        return LARSRule(self.hyperparam)

    def setup(self, link):
        super().setup(link)
        self.mark_skipped()
        return self

    def mark_skipped(self) -> list[str]:
        """(Re)mark BN/bias parameters as skipped; returns their paths. Call again after lazy init."""
        skipped = []
        for path, param in sorted(self.target.namedparams()):
            rule = param.update_rule
            if isinstance(rule, LARSRule):
                rule.skip = bool(self.skip_bn_bias and is_bn_or_bias(path, param))
                if rule.skip:
                    skipped.append(path)
        return skipped
