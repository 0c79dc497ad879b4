"""One-pass CPU update for :class:`~hpcsgd.optim.momentum.CorrectedMomentumSGD` (+ weight decay).

Why: Chainer's update runs, per parameter, the ``WeightDecay`` hook and the rule's
``step`` as five or six whole-array NumPy operations, each with a temporary, plus
Chainer's per-parameter bookkeeping (device scopes, hook dispatch, fp32-update
checks). This module does the same arithmetic in one numba pass per parameter
array and keeps only the bookkeeping that has an effect (``t`` counters, state
initialisation, ``lr_prev``). Results are bitwise those of Chainer's path: the
same float32 operations in the same order, compiled without fast-math (no FMA
contraction, no reassociation); ``tests/test_optim_fused.py`` checks it.

Per element, with ``rate`` the weight-decay rate (0: no hook) and the scalars
cast to the parameter's dtype exactly as the rule casts them::

    g <- g + rate * w            (Chainer's WeightDecay hook; written back to param.grad)
    v <- v * (m * c)
    v <- v + lr * g
    w <- w - (m * v + lr * g)    (nesterov)   or   w <- w - v

Anything this path does not cover takes Chainer's own update for that parameter
(:func:`covered`), or for the whole step when the optimizer has hooks or loss scaling.
"""

from __future__ import annotations

import numba
import numpy as np
from chainer.optimizer_hooks import WeightDecay

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@numba.njit(cache=True, nogil=True)
def _momentum_step(w, g, v, rate, mc, lr, m, decay, nesterov):  # pragma: no cover - numba
    for i in range(w.size):
        gi = g[i]
        if decay:
            gi = gi + rate * w[i]
            g[i] = gi
        vi = v[i] * mc
        vi = vi + lr * gi
        v[i] = vi
        if nesterov:
            w[i] = w[i] - (m * vi + lr * gi)
        else:
            w[i] = w[i] - vi


def optimizer_plain(opt) -> bool:
    """True when ``opt`` has no optimizer-level hooks and no loss scaling (the fused path applies)."""
    hk = opt._hookable
    return (not hk._pre_update_hooks and not hk._post_update_hooks and opt._loss_scale is None
            and not opt._loss_scaling_is_dynamic)


def decay_rate(rule) -> tuple[bool, float] | None:
    """``(True, rate)`` of the rule's one WeightDecay hook, ``(False, 0.0)`` without hooks, None
    with any other hook."""
    hk = rule._hookable
    if hk._post_update_hooks:
        return None
    hooks = list(hk._pre_update_hooks.values())
    if not hooks:
        return (False, 0.0)
    if len(hooks) == 1 and type(hooks[0]) is WeightDecay:
        return (True, float(hooks[0].rate))
    return None


def covered(param, rule) -> tuple[bool, float] | None:
    """:func:`decay_rate` when ``param`` can take the fused update, else None (Chainer's path)."""
    w, g = param.array, param.grad
    if not (type(w) is np.ndarray and type(g) is np.ndarray) or w.dtype not in _FLOATS \
            or g.dtype != w.dtype or not (w.flags.c_contiguous and g.flags.c_contiguous) \
            or param._loss_scale is not None or rule._use_fp32_update or not rule.enabled:
        return None
    v = None if rule.state is None else rule.state.get("v")
    if rule.state is not None and not (type(v) is np.ndarray and v.dtype == w.dtype and v.shape == w.shape
                                       and v.flags.c_contiguous):
        return None
    return decay_rate(rule)


def momentum_update(param, rule, decay: tuple[bool, float]) -> None:
    """Chainer's ``param.update()`` of a covered parameter; ``decay`` from :func:`covered`.

    The scalars come from the rule's own hyperparameters, as in
    :meth:`CorrectedMomentumSGDRule.step <hpcsgd.optim.momentum.CorrectedMomentumSGDRule.step>`.
    """
    rule.t += 1
    if rule.state is None:
        rule._init_states(param)
    hp = rule.hyperparam
    lr, m = float(hp.lr), float(hp.momentum)
    c = 1.0
    if hp.momentum_correction and rule.lr_prev > 0.0 and lr != rule.lr_prev:
        c = lr / rule.lr_prev
    w = param.array
    v = rule.state["v"]
    t = w.dtype.type
    has_decay, rate = decay
    _momentum_step(w.reshape(-1), param.grad.reshape(-1), v.reshape(-1), t(rate), t(m * c), t(lr), t(m),
                   has_decay, bool(hp.nesterov))
    rule.lr_prev = lr
