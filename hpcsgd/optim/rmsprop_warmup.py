"""Akiba et al.'s RMSprop warm-up: RMSprop blended smoothly into momentum SGD.

Element-wise update (papers.md sec. 1(a), u-form: the LR is outside the buffer)::

    m      <- mu2 * m + (1 - mu2) * g**2
    delta  <- mu1 * delta - (alpha_sgd + alpha_rmsprop / (sqrt(m) + eps)) * g
    w      <- w + lr * delta

    alpha_rmsprop = (1 - alpha_sgd) * eta_rmsprop / lr     (A2; UNCONFIRMED in the paper)

so the effective RMSprop step is ``(1 - alpha_sgd) * eta_rmsprop`` whatever
the LR. ``alpha_rmsprop`` is recomputed from the current ``lr`` at every
update, so it follows every LR change (pitfall 4). With ``lr == 0`` the RMSprop
term is dropped (``alpha_rmsprop = 0``): the step ``lr * delta`` is 0 anyway.

Stated defaults (A2's, UNCONFIRMED for the paper): ``mu1 = 0.9``,
``mu2 = 0.99``, ``eps = 1e-8``, ``eta_rmsprop = 3e-4``. ``alpha_sgd`` is a
hyperparameter set per iteration by the recipe from
:func:`hpcsgd.schedules.alpha_sgd` at the fractional epoch (ELU-consistent
middle piece, clamped at 1). Once ``alpha_sgd == 1`` the rule is exactly
u-form momentum SGD (``w += lr * delta``, ``delta <- mu1 delta - g``), which
needs no momentum correction when the LR drops (pitfall 5).
"""

from __future__ import annotations

from chainer import optimizer

from hpcsgd.optim.base import XpUpdateRule, as_scalar


def alpha_rmsprop(alpha_sgd: float, lr: float, eta_rmsprop: float) -> float:
    """``(1 - alpha_sgd) * eta_rmsprop / lr`` (0 when ``lr == 0``)."""
    if lr == 0.0:
        return 0.0
    return (1.0 - alpha_sgd) * eta_rmsprop / lr


class RMSpropWarmupRule(XpUpdateRule):
    """Update rule of :class:`RMSpropWarmup`; state ``ms`` (m) and ``delta``."""

    is_elementwise = True

    def init_state(self, param):
        xp = param.device.xp
        self.state["ms"] = xp.zeros_like(param.array)
        self.state["delta"] = xp.zeros_like(param.array)

    def step(self, xp, param, grad):
        hp = self.hyperparam
        lr = float(hp.lr)
        a_sgd = float(hp.alpha_sgd)
        a_rms = alpha_rmsprop(a_sgd, lr, float(hp.eta_rmsprop))
        dt = param.array.dtype
        ms, delta = self.state["ms"], self.state["delta"]
        ms *= as_scalar(hp.mu2, dt)
        ms += as_scalar(1.0 - hp.mu2, dt) * grad * grad
        delta *= as_scalar(hp.mu1, dt)
        coef = as_scalar(a_sgd, dt)
        if a_rms != 0.0:
            coef = coef + as_scalar(a_rms, dt) / (xp.sqrt(ms) + as_scalar(hp.eps, dt))
        delta -= coef * grad
        param.array += as_scalar(lr, dt) * delta


class RMSpropWarmup(optimizer.GradientMethod):
    """Akiba's RMSprop warm-up optimizer (see the module docstring for the rule).

    Args:
        lr: eta, the momentum-SGD learning rate (slow-start schedule).
        alpha_sgd: weight of the SGD term in [0, 1]; set per iteration by the recipe.
        eta_rmsprop: RMSprop learning rate (3e-4).
        mu1: momentum of delta (0.9).
        mu2: decay of the squared-gradient average m (0.99).
        eps: added to sqrt(m) (1e-8).
    """

    def __init__(self, lr: float = 0.1, alpha_sgd: float = 0.0, eta_rmsprop: float = 3e-4,
                 mu1: float = 0.9, mu2: float = 0.99, eps: float = 1e-8):
        super().__init__()
        if not 0.0 <= alpha_sgd <= 1.0:
            raise ValueError(f"alpha_sgd must be in [0, 1], got {alpha_sgd}")
        self.hyperparam.lr = lr
        self.hyperparam.alpha_sgd = alpha_sgd
        self.hyperparam.eta_rmsprop = eta_rmsprop
        self.hyperparam.mu1 = mu1
        self.hyperparam.mu2 = mu2
        self.hyperparam.eps = eps

    lr = optimizer.HyperparameterProxy("lr")
    alpha_sgd = optimizer.HyperparameterProxy("alpha_sgd")
    eta_rmsprop = optimizer.HyperparameterProxy("eta_rmsprop")
    mu1 = optimizer.HyperparameterProxy("mu1")
    mu2 = optimizer.HyperparameterProxy("mu2")
    eps = optimizer.HyperparameterProxy("eps")

    @property
    def alpha_rmsprop(self) -> float:
        """The alpha_RMSprop the next update will use."""
        return alpha_rmsprop(self.alpha_sgd, self.lr, self.eta_rmsprop)

    def create_update_rule(self):
        return RMSpropWarmupRule(self.hyperparam)
