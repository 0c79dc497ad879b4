"""Pure logic of the convergence study: no I/O, no MPI, tested on synthetic records.

Units everywhere: errors in percent (test top-1 error = 100 * (1 - top1)),
batches and B_noise in images, steps in optimizer steps, epochs in passes
over the 60,000 training images.

A *curve* is a list of evaluations ``{"iteration": int, "epoch": float,
"error": float}`` sorted by iteration; a *record* is one run's dict (see
:mod:`convergence_study.runner`), of which this module reads ``evals``,
``final_error``, ``noise``, ``batch``, ``recipe``, ``seed``, ``lr``.
"""

from __future__ import annotations

import math
import statistics

#: Chance error of a 10-class problem: what a diverged run scores.
CHANCE_ERROR = 90.0


def spread(errors: list[float]) -> dict:
    """Mean, max-min spread and half-spread (the '±' of the tables) of a cell's seed errors."""
    if not errors:
        raise ValueError("no errors to aggregate")
    lo, hi = min(errors), max(errors)
    return {
        "mean": statistics.fmean(errors),
        "spread": hi - lo,
        "half_spread": (hi - lo) / 2.0,
        "n": len(errors),
        "errors": list(errors),
    }


def steps_to_target(curve: list[dict], target: float) -> dict | None:
    """Optimizer steps until the test error first reaches ``target`` (%), or None if it never does.

    Why two numbers: the curve is sampled every few steps, so the first
    evaluation at or below the target is an upper bound (``first_eval``); the
    estimate (``steps``) interpolates linearly between it and the evaluation
    before, which is what the plot uses. Both are in optimizer steps.
    """
    prev = None
    for point in curve:
        if point["error"] <= target:
            if prev is None or prev["error"] == point["error"]:
                steps = float(point["iteration"])
            else:
                frac = (prev["error"] - target) / (prev["error"] - point["error"])
                steps = prev["iteration"] + frac * (point["iteration"] - prev["iteration"])
            return {"steps": steps, "first_eval": point["iteration"], "epoch": point["epoch"]}
        prev = point
    return None


def choose_target(baseline_final_errors: list[float], margin: float = 1.0) -> float:
    """The steps-to-target error (%): the baseline's mean final error + ``margin``, rounded up to 0.1.

    Why this one: every baseline seed ends below it, so the baseline reaches it
    with room to spare (the study reports at which fraction of its budget), and
    a run that reaches it is, at that moment, within ``margin`` of the
    baseline's final error: the same 1-point yardstick as the fixed-epoch part.
    """
    if not baseline_final_errors:
        raise ValueError("no baseline runs to choose the target from")
    return math.ceil((statistics.fmean(baseline_final_errors) + margin) * 10.0 - 1e-9) / 10.0


def budget_check(errors_by_epochs: dict[float, list[float]], tol: float = 0.3) -> dict:
    """Is the baseline converged at budget E? Compares its mean error at E and 2E.

    ``errors_by_epochs``: {epochs: [final error of each seed]}. Returns every
    (E, 2E) pair present with both means and their difference, and ``chosen``:
    the smallest E whose mean error is within ``tol`` points of the mean at 2E
    (None if no pair passes, then the study's budget is unverified).
    """
    pairs, chosen = [], None
    for e in sorted(errors_by_epochs):
        e2 = next((x for x in errors_by_epochs if math.isclose(x, 2 * e)), None)
        if e2 is None or not errors_by_epochs[e] or not errors_by_epochs[e2]:
            continue
        m1, m2 = statistics.fmean(errors_by_epochs[e]), statistics.fmean(errors_by_epochs[e2])
        ok = abs(m1 - m2) <= tol
        pairs.append(
            {
                "epochs": e,
                "epochs_2x": e2,
                "error": m1,
                "error_2x": m2,
                "difference": m1 - m2,
                "within_tol": ok,
                "seeds": len(errors_by_epochs[e]),
            }
        )
        if ok and chosen is None:
            chosen = e
    return {"tol": tol, "pairs": pairs, "chosen": chosen}


def best_run(records: list[dict], key: str = "final_error") -> dict | None:
    """The record with the lowest ``key`` (final error, or steps to target); None-valued ones lose."""
    scored = [(r.get(key), i, r) for i, r in enumerate(records) if r]
    scored = [(v if v is not None and math.isfinite(v) else math.inf, i, r) for v, i, r in scored]
    return min(scored)[2] if scored else None


def largest_batch_within(
    errors_by_batch: dict[int, float], baseline_error: float, tol: float = 1.0, grid=None
) -> dict:
    """The largest batch up to which every grid batch stays within ``tol`` points of the baseline.

    Contiguous from the smallest batch: a lucky large batch above a failed
    smaller one does not count. ``censored`` says that the largest measured
    batch passed, so the true limit may lie above the grid. With ``grid`` (every
    batch of the design), a grid batch not measured yet below the first failure
    makes the answer ``complete: False``: only a lower bound so far.
    """
    largest, complete = None, True
    batches = sorted(errors_by_batch)
    for b in sorted(set(grid or ()) | set(batches)):
        if b not in errors_by_batch:
            complete = False
            break
        if errors_by_batch[b] - baseline_error <= tol:
            largest = b
        else:
            break
    censored = complete and largest is not None and largest == batches[-1]
    first_out = next((b for b in batches if errors_by_batch[b] - baseline_error > tol), None)
    inside = [b for b in batches if first_out is None or b < first_out]  # all within, by first_out's choice
    return {
        "batch": largest,
        "censored": censored,
        "tol": tol,
        "complete": complete,
        # the measured cells around the limit, whatever is still missing below it: if the error
        # grows with the batch (as every recipe's measured cells do), the limit lies in [within, out)
        "bracket": {"within": inside[-1] if inside else None, "out": first_out},
    }


def nearest_batch(batches: list[int], b_noise: float | None) -> int | None:
    """The grid batch closest to ``b_noise`` on a log scale (None without a B_noise)."""
    if not batches or b_noise is None or not b_noise > 0:
        return None
    return min(batches, key=lambda b: (abs(math.log2(b / b_noise)), b))


def noise_window(series: list[dict], start: float, end: float) -> float | None:
    """Median of the smoothed B_noise (images) logged at epochs in [start, end]; None if none there."""
    values = [
        p["b_noise"]
        for p in series
        if start <= p["epoch"] <= end and p.get("b_noise") is not None and p["b_noise"] > 0
    ]
    return statistics.median(values) if values else None


def noise_early_late(
    series: list[dict],
    epochs: float,
    early_end: float = 2.0,
    early_start: float = 0.25,
    late_fraction: float = 0.25,
) -> dict:
    """B_noise of one run early (epochs [early_start, early_end]) and late (its last ``late_fraction``)."""
    return {
        "early": noise_window(series, early_start, early_end),
        "late": noise_window(series, epochs * (1.0 - late_fraction), epochs),
    }


def noise_at_epoch(series: list[dict], epoch: float, half_width: float = 1.0) -> float | None:
    """B_noise around ``epoch`` (median over [epoch - half_width, epoch + half_width]).

    Why: McCandlish et al.'s critical batch for a target is the noise scale *at that target's
    loss*; B_noise grows ~100x over a run here, so the early and late windows bracket it widely.
    Read at the epoch where the baseline reaches the steps part's target, it is their prediction
    of the largest batch that still reaches the target without a large step penalty.
    """
    return noise_window(series, epoch - half_width, epoch + half_width)


def combine_noise(per_run: list[dict]) -> dict:
    """Median over runs of their early and late B_noise; None where no run measured it."""
    out = {}
    for phase in ("early", "late"):
        vals = [r[phase] for r in per_run if r.get(phase) is not None]
        out[phase] = statistics.median(vals) if vals else None
        out[f"{phase}_runs"] = len(vals)
    return out


def prediction_check(b_noise: float | None, largest: dict) -> dict:
    """Does ``b_noise`` (early, or at the target) predict the largest batch within 1 point, within 2x?

    ``ratio`` = largest batch / ``b_noise``. A censored largest batch (the
    grid's top passed) is a lower bound, so only ``ratio < 0.5`` can be judged
    a miss then; ``verdict`` is 'yes', 'no', 'at least' or 'unknown'.
    """
    b = largest.get("batch")
    if not largest.get("complete", True):
        lo = (largest.get("bracket") or {}).get("within")
        if b_noise and lo and lo / b_noise > 2.0:
            # the measured cells already put the limit above 2x the prediction (if error grows with batch)
            return {"ratio": lo / b_noise, "verdict": "no (from the measured cells; grid incomplete)"}
        return {"ratio": None, "verdict": "pending (grid incomplete)"}
    if b_noise is None or b is None:
        return {"ratio": None, "verdict": "unknown"}
    ratio = b / b_noise
    if 0.5 <= ratio <= 2.0:
        verdict = "yes"
    elif largest.get("censored") and ratio > 2.0:
        verdict = "at least"
    else:
        verdict = "no"
    return {"ratio": ratio, "verdict": verdict}


def gap_verdict(baseline_errors: list[float], other_errors: list[float], reference_gap: float) -> dict:
    """Is a measured error gap (other - baseline) consistent with a reference gap, given seed noise?

    The gap's standard error is sqrt(s_a^2/n_a + s_b^2/n_b) from the seeds'
    sample standard deviations; the measured gap is 'consistent' with the
    reference if it lies within 2 standard errors of it. Needs >= 2 seeds on
    each side (else 'too few seeds').
    """
    if len(baseline_errors) < 2 or len(other_errors) < 2:
        return {"gap": None, "se": None, "verdict": "too few seeds"}
    gap = statistics.fmean(other_errors) - statistics.fmean(baseline_errors)
    se = math.sqrt(
        statistics.variance(baseline_errors) / len(baseline_errors)
        + statistics.variance(other_errors) / len(other_errors)
    )
    consistent = abs(gap - reference_gap) <= 2.0 * se
    return {
        "gap": gap,
        "se": se,
        "reference_gap": reference_gap,
        "verdict": "consistent with the reference (seed noise)"
        if consistent
        else "differs from the reference beyond seed noise",
    }


def perfect_scaling(batches: list[int], base_batch: int, base_steps: float) -> list[float]:
    """Steps of perfect scaling from (base_batch, base_steps): steps proportional to 1/batch."""
    return [base_steps * base_batch / b for b in batches]
