"""Learning-rate and blending schedules as functions of the fractional epoch.

Every schedule here is a pure function ``f(epoch, ...) -> float`` where
``epoch`` is fractional: iteration ``i`` of a run with ``N`` iterations per
epoch is at ``epoch = i / N`` (see :func:`epoch_at`). Evaluating per iteration
(not per whole epoch) is what Goyal et al. prescribe for the warm-up and what
hpcsgd does for every schedule, Akiba's alpha_SGD included.

Formulas (papers.md sections 1, 3, 4; all learning rates are per-image-step
LRs in the optimizer's own units):

* linear scaling: ``eta = 0.1 * B / 256`` (Goyal sec. 3(a)).
* Goyal warm-up: linear per iteration from ``start_lr`` (0.1) to ``peak`` over
  ``warmup_epochs`` (5), then ``peak * 0.1**k`` after the k-th milestone
  (30, 60, 80).
* Akiba slow start: ``base * factor_j`` for ``epoch >= milestone_j`` with
  factors 0.5/0.075/0.01/0.001 at 0/40/70/85.
* alpha_SGD (Akiba RMSprop warm-up, beta_c = 10, beta_p = 5):
  ``1/2 exp(2 (e - c)/p)`` for ``e < c``; middle piece ``1/2 + (e - c)/p``
  (the ELU-consistent form: continuous slope at ``c``, reaches 1 at
  ``c + p/2``); 1 afterwards; always clamped to ``<= 1``. The transcribed
  factor-2 middle piece (A1/A2) is available as ``form='transcribed'``, also
  clamped.
* LARS polynomial decay: linear warm-up from ``warmup_start`` to ``peak``
  over ``warmup_epochs``, then ``(peak - end) (1 - (e - w)/(E - w))**power +
  end`` with power 2 (You et al. Algorithm 1; TF TPU reference structure).
* step decay and cosine decay (with optional linear warm-up).
"""

from __future__ import annotations

import math
from typing import Sequence

from hpcsgd.errors import ConfigError

#: Akiba slow start: (start epoch, multiplier of eta_base) for a 90-epoch run.
AKIBA_MILESTONES: tuple[float, ...] = (0.0, 40.0, 70.0, 85.0)
AKIBA_FACTORS: tuple[float, ...] = (0.5, 0.075, 0.01, 0.001)
#: Goyal et al.: x0.1 at these epochs of a 90-epoch run.
GOYAL_MILESTONES: tuple[float, ...] = (30.0, 60.0, 80.0)


def epoch_at(iteration: int, iters_per_epoch: int) -> float:
    """Fractional epoch of (0-based) ``iteration``: ``iteration / iters_per_epoch``."""
    if iters_per_epoch <= 0:
        raise ConfigError(f"iters_per_epoch must be positive, got {iters_per_epoch}")
    return iteration / float(iters_per_epoch)


def linear_scaling_lr(global_batch: int, base_lr: float = 0.1, base_batch: int = 256) -> float:
    """Goyal's linear scaling rule: ``base_lr * global_batch / base_batch`` (0.1 per 256 images)."""
    if global_batch <= 0:
        raise ConfigError(f"global_batch must be positive, got {global_batch}")
    return base_lr * global_batch / float(base_batch)


def step_decay(epoch: float, base_lr: float, milestones: Sequence[float] = GOYAL_MILESTONES,
               gamma: float = 0.1) -> float:
    """``base_lr * gamma**k`` where k is the number of milestones ``<= epoch``."""
    k = sum(1 for m in milestones if epoch >= m)
    return base_lr * gamma ** k


def linear_warmup(epoch: float, start_lr: float, peak_lr: float, warmup_epochs: float) -> float:
    """Linear ramp from ``start_lr`` at epoch 0 to ``peak_lr`` at ``warmup_epochs`` (then flat)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return peak_lr
    return start_lr + (peak_lr - start_lr) * max(epoch, 0.0) / warmup_epochs


def goyal_lr(epoch: float, peak_lr: float, warmup_epochs: float = 5.0, start_lr: float = 0.1,
             milestones: Sequence[float] = GOYAL_MILESTONES, gamma: float = 0.1) -> float:
    """Goyal et al.'s gradual warm-up then step decay.

    Per iteration from ``min(start_lr, peak_lr)`` (0.1: the LR of batch 256)
    to ``peak_lr`` (= k * 0.1) over ``warmup_epochs``, then x``gamma`` at each
    milestone. For batches below 256 (``peak_lr < 0.1``) there is no ramp
    (the warm-up starts at the peak), as Goyal warms up only for k > 1.
    """
    if epoch < warmup_epochs:
        return linear_warmup(epoch, min(start_lr, peak_lr), peak_lr, warmup_epochs)
    return step_decay(epoch, peak_lr, milestones, gamma)


def akiba_lr(epoch: float, base_lr: float, milestones: Sequence[float] = AKIBA_MILESTONES,
             factors: Sequence[float] = AKIBA_FACTORS) -> float:
    """Akiba's slow start: ``base_lr * factors[j]`` for the last ``milestones[j] <= epoch``.

    ``base_lr`` is eta_base = 0.1 * B / 256 (12.8 for B = 32768), so the
    defaults give 6.4 / 0.96 / 0.128 / 0.0128 for 32k.
    """
    if len(milestones) != len(factors):
        raise ConfigError(f"akiba milestones ({len(milestones)}) and factors ({len(factors)}) "
                          "differ in length")
    factor = factors[0]
    for m, f in zip(milestones, factors):
        if epoch >= m:
            factor = f
    return base_lr * factor


def alpha_sgd(epoch: float, center: float = 10.0, period: float = 5.0, form: str = "elu") -> float:
    """Akiba's alpha_SGD(e): the weight of the SGD term in RMSprop warm-up, in [0, 1].

    ``form='elu'`` (default): middle piece ``1/2 + (e - c)/p``, which matches
    the slope of the exponential at ``c`` and reaches 1 at ``c + p/2`` (A1's
    prose). ``form='transcribed'``: ``1/2 + 2 (e - c)/p`` as printed in A1/A2.
    Both are clamped to ``<= 1`` (papers.md sec. 1(d) pitfall 3).
    """
    if period <= 0:
        raise ConfigError(f"alpha_sgd period must be positive, got {period}")
    if form not in ("elu", "transcribed"):
        raise ConfigError(f"alpha_sgd form must be 'elu' or 'transcribed', got {form!r}")
    if epoch < center:
        value = 0.5 * math.exp(2.0 * (epoch - center) / period)
    elif form == "elu":
        value = 0.5 + (epoch - center) / period
    else:
        value = 0.5 + 2.0 * (epoch - center) / period
    return min(value, 1.0)


def poly_lr(epoch: float, peak_lr: float, total_epochs: float, power: float = 2.0,
            warmup_epochs: float = 5.0, warmup_start: float = 0.0, end_lr: float = 0.0) -> float:
    """LARS schedule: linear warm-up, then polynomial decay to ``end_lr`` at ``total_epochs``."""
    if epoch < warmup_epochs:
        return linear_warmup(epoch, warmup_start, peak_lr, warmup_epochs)
    span = total_epochs - warmup_epochs
    if span <= 0:
        return end_lr
    frac = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return (peak_lr - end_lr) * (1.0 - frac) ** power + end_lr


def cosine_lr(epoch: float, peak_lr: float, total_epochs: float, warmup_epochs: float = 0.0,
              warmup_start: float = 0.0, end_lr: float = 0.0) -> float:
    """Linear warm-up, then half a cosine from ``peak_lr`` down to ``end_lr`` at ``total_epochs``."""
    if epoch < warmup_epochs:
        return linear_warmup(epoch, warmup_start, peak_lr, warmup_epochs)
    span = total_epochs - warmup_epochs
    if span <= 0:
        return end_lr
    frac = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return end_lr + 0.5 * (peak_lr - end_lr) * (1.0 + math.cos(math.pi * frac))


def lars_reference_peak(global_batch: int) -> tuple[float, float]:
    """(peak LR, warm-up epochs) of the TF TPU LARS reference (papers.md sec. 4(a), Y5).

    25 / 5 epochs for B <= 16K; 34 / 12 for B <= 32K; 41 / 16 above.
    """
    if global_batch <= 16384:
        return 25.0, 5.0
    if global_batch <= 32768:
        return 34.0, 12.0
    return 41.0, 16.0
