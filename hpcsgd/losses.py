"""Classification losses, with label smoothing as an option.

``softmax_cross_entropy(logits, t, label_smoothing=eps)`` is the mean over the
batch of ``-sum_k q_k log softmax(logits)_k`` with the smoothed target
``q = (1 - eps) * onehot(t) + eps / K`` (Szegedy et al.; Mikami et al. v2 used
it for ImageNet; none of Akiba/Goyal/You mention it, so it is off by default).
With ``eps = 0`` this is ``chainer.functions.softmax_cross_entropy``.
"""

from __future__ import annotations

import chainer
import chainer.functions as F

from hpcsgd.errors import ConfigError


def softmax_cross_entropy(logits, t, label_smoothing: float = 0.0) -> chainer.Variable:
    """Mean cross-entropy of ``logits`` (N, K) against int labels ``t`` (N,), optionally smoothed."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing == 0.0:
        return F.softmax_cross_entropy(logits, t)
    n_classes = logits.shape[1]
    logp = F.log_softmax(logits)
    nll = -F.select_item(logp, t)
    uniform = -F.sum(logp, axis=1) / n_classes
    return F.mean((1.0 - label_smoothing) * nll + label_smoothing * uniform)


def make_loss(label_smoothing: float = 0.0):
    """A ``loss(logits, t)`` callable with the given smoothing (for configs)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return lambda logits, t: softmax_cross_entropy(logits, t, label_smoothing)
