"""The study's parts; each asks :class:`runner.Study` for its runs and returns its JSON result.

Parts share runs through the record cache (a run is identified by its
settings): the baseline's 20-epoch seeds serve the budget check, the fixed
comparison, the steps-to-target target and the LARS-gap sub-study alike, and
the fixed part's 1k/4k/8k LR grids are points of the steps-to-target grid.
Any part can run first; one that needs another's result (the budget, the
tuned LR) reads it from the cached records, and falls back to a stated
default when they are missing (``budget_verified: false``, ``lr_tuned: false``).
"""

from __future__ import annotations

import math
import statistics

from convergence_study import analysis as A
from convergence_study import design as D

PARTS = ("budget-check", "lars-gap", "fixed", "steps", "akiba-bn")
#: The independent implementation's numbers (one seed each, 20 epochs): error % and gap.
REFERENCE = {
    "baseline_error": 7.8,
    "lars_1k_error": 8.5,
    "lars_gap": 0.8,
    "hpcsgd_reported": {"baseline_error": 8.14, "lars_1k_error": 9.53},
}


def baseline_settings(st, seed: int, epochs: float, lr: float | None = None) -> dict:
    d = st.d
    return D.run_settings(
        d, "sgd", d.base_batch, seed, lr if lr is not None else D.rule_lr("sgd", d.base_batch), epochs
    )


# -- budget ---------------------------------------------------------------------------------------
def budget_check(st) -> dict:
    """Baseline (rule LR, cosine) at each budget E and 2E: is it converged at E within 0.3 points?

    Then the same check at the baseline's tuned LR (E and 2E, the budget seeds), once the
    fixed part has tuned it: the budget must hold for the baseline the recipes are compared with.
    """
    d, errors, names = st.d, {}, {}
    for e in d.budget_epochs:
        for seed in d.budget_seeds:
            rec = st.run("baseline", baseline_settings(st, seed, e), "budget-check")
            if rec:
                errors.setdefault(e, []).append(rec["final_error"])
                names.setdefault(e, []).append(rec["name"])
    out = dict(A.budget_check(errors, d.budget_tol), runs=names)
    out["at_tuned_lr"] = _budget_at_tuned_lr(st, out["chosen"] or d.default_epochs)
    return out


def _budget_at_tuned_lr(st, epochs: float) -> dict | None:
    """E vs 2E for the baseline at its tuned LR (read from the cached LR grid; None before tuning)."""
    d = st.d
    runs = [st.cache.get(D.run_key(D.run_settings(d, "sgd", d.base_batch, d.tune_seed,
                                                   D.rule_lr("sgd", d.base_batch) * f, epochs)))
            for f in d.lr_factors]
    if not all(runs):
        return None
    lr, _ = tuned_lr(st, "sgd", d.base_batch, epochs, "budget-check")
    errors, names = {}, {}
    for e in (epochs, 2 * epochs):
        for seed in d.budget_seeds:
            rec = st.run("baseline", baseline_settings(st, seed, e, lr), "budget-check")
            if rec:
                errors.setdefault(e, []).append(rec["final_error"])
                names.setdefault(e, []).append(rec["name"])
    return dict(A.budget_check(errors, d.budget_tol), lr=lr, runs=names)


def study_epochs(st) -> tuple[float, bool]:
    """(epoch budget, verified): forced, else the budget check's choice from cached runs, else the default."""
    d = st.d
    if d.epochs:
        return d.epochs, False
    errors = {}
    for e in d.budget_epochs:
        recs = [st.cache.get(D.run_key(baseline_settings(st, s, e))) for s in d.budget_seeds]
        if all(recs):
            errors[e] = [r["final_error"] for r in recs]
    chosen = A.budget_check(errors, d.budget_tol)["chosen"]
    return (chosen, True) if chosen else (d.default_epochs, False)


# -- LR grid and tuned cells ----------------------------------------------------------------------
def label_of(recipe: str, batch: int, d) -> str:
    return "baseline" if recipe == "sgd" and batch == d.base_batch else recipe


def grid(st, recipe: str, batch: int, epochs: float, part: str) -> list[dict]:
    """The LR grid of one (recipe, batch) at the tuning seed: factor x the recipe's rule, one run each.

    When the complete grid's best final error sits at an edge, one more factor beyond that edge
    is run (``Design.lr_extend`` times at most): every recipe gets the same rule, so the same budget.
    """
    d, out = st.d, []

    def run(f):
        s = D.run_settings(d, recipe, batch, d.tune_seed, D.rule_lr(recipe, batch) * f, epochs,
                           recipe_extra=d.compare_extra.get(recipe))
        rec = st.run(label_of(recipe, batch, d), s, part)
        if rec:
            out.append(dict(rec, lr_factor=f))
        return rec

    factors = sorted(d.lr_factors)
    for f in factors:
        run(f)
    for _ in range(d.lr_extend):
        if len(out) < len(factors) or len(factors) < 2:
            break  # incomplete (plan or report mode): no edge to judge
        best = A.best_run(out)["lr_factor"]
        if best == factors[-1]:
            f = factors[-1] * factors[-1] / factors[-2]
        elif best == factors[0]:
            f = factors[0] * factors[0] / factors[1]
        else:
            break
        factors = sorted(factors + [f])
        if not run(f):
            break
    # closest to the rule first, so that a tie keeps the rule's LR (best_run keeps the first of equals)
    return sorted(out, key=lambda r: (abs(math.log2(r["lr_factor"])), r["lr_factor"]))


def tuned_lr(st, recipe: str, batch: int, epochs: float, part: str, key: str = "final_error") -> tuple:
    """(lr, tuned?) of a cell: the grid's best by ``key``; the rule's LR while the grid is incomplete."""
    runs = grid(st, recipe, batch, epochs, part)
    if len(runs) < len(st.d.lr_factors):
        return D.rule_lr(recipe, batch), False
    return A.best_run(runs, key)["lr"], True


def cell(st, recipe: str, batch: int, epochs: float, part: str, seeds=None) -> dict:
    """A tuned cell: the grid, then every seed at the best LR; error mean ± spread over the seeds run."""
    d = st.d
    lr, tuned = tuned_lr(st, recipe, batch, epochs, part)
    recs = []
    for seed in seeds if seeds is not None else d.seeds:
        extra = d.compare_extra.get(recipe)
        settings = D.run_settings(d, recipe, batch, seed, lr, epochs, recipe_extra=extra)
        rec = st.run(label_of(recipe, batch, d), settings, part)
        if rec:
            recs.append(rec)
    row = {
        "recipe": label_of(recipe, batch, d),
        "batch": batch,
        "lr": lr,
        "lr_tuned": tuned,
        "steps": math.ceil(D.iters_per_epoch(batch) * epochs - 1e-9),
        "seeds": [r["seed"] for r in recs],
        "runs": [r["name"] for r in recs],
        "grid": {
            str(r["lr_factor"]): r["final_error"]
            for r in sorted(grid(st, recipe, batch, epochs, part), key=lambda r: r["lr_factor"])
        },
    }
    # the best LR at an end of the grid even after its extensions: the optimum may lie beyond it
    factors = [float(f) for f in row["grid"]]
    ends = (min(factors), max(factors)) if len(factors) > 1 else ()
    row["lr_at_grid_edge"] = tuned and any(math.isclose(lr, D.rule_lr(recipe, batch) * f) for f in ends)
    if recs:
        row.update(A.spread([r["final_error"] for r in recs]))
    return row


# -- fixed epochs ---------------------------------------------------------------------------------
def baseline_noise(st, epochs: float, part: str) -> dict:
    """Early and late B_noise of the tuned baseline's runs (median over seeds), from cached records."""
    lr, _ = tuned_lr(st, "sgd", st.d.base_batch, epochs, part)
    per = []
    for seed in st.d.seeds:
        rec = st.cache.get(D.run_key(baseline_settings(st, seed, epochs, lr)))
        if rec and rec.get("noise"):
            per.append(A.noise_early_late(rec["noise"], epochs, early_end=st.d.early_epochs))
    return A.combine_noise(per)


def fixed(st) -> dict:
    """Baseline vs every recipe at the fixed batches (and the batch nearest the late B_noise), same budget."""
    d = st.d
    epochs, verified = study_epochs(st)
    base = cell(st, "sgd", d.base_batch, epochs, "fixed")
    noise = baseline_noise(st, epochs, "fixed")
    near = A.nearest_batch([b for b in d.batches if b > d.base_batch], noise.get("late"))
    batches = sorted(set(d.fixed_batches) | ({near} if near else set()))
    rows = [base] + [cell(st, r, b, epochs, "fixed") for b in batches for r in d.recipes]
    for row in rows:
        if "mean" in row and "mean" in base:
            row["vs_baseline"] = row["mean"] - base["mean"]
    at_32x = [r for r in rows if r["batch"] == 32 * d.base_batch and "vs_baseline" in r]
    best = min(at_32x, key=lambda r: r["vs_baseline"]) if at_32x else None
    return {
        "epochs": epochs,
        "budget_verified": verified,
        "rows": rows,
        "b_noise": noise,
        "batch_nearest_late_b_noise": near,
        "target_within_1_at_b_noise": _any_within(rows, near, len(d.recipes), d.tol),
        "best_at_32x": {"recipe": best["recipe"], "vs_baseline": best["vs_baseline"],
                        "recipes_measured": len(at_32x), "recipes": len(d.recipes)} if best else None,
    }


def _any_within(rows: list[dict], batch, n_recipes: int, tol: float):
    """True once a recipe at ``batch`` is within ``tol``; False only when every recipe there was
    measured and none is; None (pending) before that."""
    at = [r for r in rows if r["batch"] == batch and "vs_baseline" in r]
    if any(r["vs_baseline"] <= tol for r in at):
        return True
    return False if at and len(at) == n_recipes else None


# -- steps to target ------------------------------------------------------------------------------
def steps(st) -> dict:
    """Steps to the target error vs batch, per recipe, with the LR tuned per batch (fewest steps)."""
    d = st.d
    epochs, verified = study_epochs(st)
    base = cell(st, "sgd", d.base_batch, epochs, "steps")
    target = A.choose_target(base["errors"], d.target_margin) if "errors" in base else None
    base_recs = [
        st.cache[k]
        for k in (D.run_key(baseline_settings(st, s, epochs, base["lr"])) for s in base["seeds"])
        if k in st.cache
    ]
    reach = [A.steps_to_target(r["evals"], target) for r in base_recs] if target is not None else []
    curves, largest, noise = {}, {}, baseline_noise(st, epochs, "steps")
    at = [A.noise_at_epoch(r["noise"], x["steps"] / D.iters_per_epoch(d.base_batch))
          for r, x in zip(base_recs, reach) if x and r.get("noise")]
    at = [v for v in at if v is not None]
    noise["at_target"] = statistics.median(at) if at else None  # median over the baseline's seeds
    for recipe in d.recipes:
        curves[recipe], errs = _steps_curve(st, recipe, epochs, target)
        if errs and "mean" in base:
            grid_b = [b for b in d.batches if recipe == "sgd" or b != d.base_batch]  # as run above
            lb = A.largest_batch_within(errs, base["mean"], d.tol, grid=grid_b)
            largest[recipe] = dict(lb, errors=errs, prediction=A.prediction_check(noise.get("early"), lb),
                                   prediction_at_target=A.prediction_check(noise["at_target"], lb))
    return {
        "epochs": epochs,
        "budget_verified": verified,
        "target_error": target,
        "baseline_reaches_target": [
            {
                "seed": r["seed"],
                **(x or {}),
                "fraction_of_budget": (x["steps"] / (D.iters_per_epoch(d.base_batch) * epochs))
                if x
                else None,
            }
            for r, x in zip(base_recs, reach)
        ],
        "curves": curves,
        "largest_within": largest,
        "b_noise": noise,
        "baseline_error": base.get("mean"),
    }


def _steps_curve(st, recipe: str, epochs: float, target: float | None) -> tuple[list[dict], dict]:
    """One recipe's steps-to-target points over the batch grid, and its tuned final error per batch.

    The points take each batch's LR with the fewest steps to the target (Shallue et al.); the
    errors are the seed mean at the LR with the lowest final error, this design's runs only.
    """
    d = st.d
    points, errs = [], {}
    for b in d.batches:
        if recipe != "sgd" and b == d.base_batch:
            continue
        runs = grid(st, recipe, b, epochs, "steps")
        if not runs:
            continue
        for r in runs:
            r["to_target"] = A.steps_to_target(r["evals"], target) if target is not None else None
            r["steps_to_target"] = r["to_target"]["steps"] if r["to_target"] else None
        best = A.best_run(runs, "steps_to_target")
        points.append(
            {
                "batch": b,
                "steps": best["steps_to_target"],
                "lr": best["lr"],
                "first_eval": (best["to_target"] or {}).get("first_eval"),
                "cap": D.iters_per_epoch(b) * epochs,
                "reached": best["to_target"] is not None,
            }
        )
        lr, _ = tuned_lr(st, recipe, b, epochs, "steps")
        seeds = {*d.seeds, d.tune_seed}
        extra = d.compare_extra.get(recipe)
        keys = {D.run_key(D.run_settings(d, recipe, b, s, lr, epochs, recipe_extra=extra)) for s in seeds}
        same = [st.cache[k] for k in keys if k in st.cache]  # the tuned LR's seeds of this design only
        if same:
            errs[b] = statistics.fmean(r["final_error"] for r in same)
    return points, errs


# -- Akiba's BN -----------------------------------------------------------------------------------
AKIBA_BN = {
    "batch": ("batch", {}),
    "batch-mean": ("batch", {"var_combine": "mean"}),
    "running": ("running", {}),
}


def akiba_bn(st) -> dict:
    """Akiba's recipe with its 'batch' BN (whole-step statistics), the per-micro-batch mean, and running."""
    d = st.d
    epochs, _ = study_epochs(st)
    rows = []
    for b in d.fixed_batches:
        lr, tuned = tuned_lr(st, "akiba", b, epochs, "akiba-bn")
        for variant in d.akiba_bn_variants:
            mode, extra = AKIBA_BN[variant]
            recs = [
                st.run(
                    f"akiba-bn-{variant}",
                    D.run_settings(d, "akiba", b, s, lr, epochs, bn_mode=mode, model_extra=extra),
                    "akiba-bn",
                )
                for s in d.seeds
            ]
            recs = [r for r in recs if r]
            row = {
                "batch": b,
                "variant": variant,
                "lr": lr,
                "lr_tuned": tuned,
                "runs": [r["name"] for r in recs],
            }
            if recs:
                row.update(A.spread([r["final_error"] for r in recs]))
            rows.append(row)
    return {"epochs": epochs, "rows": rows}


# -- the LARS gap ---------------------------------------------------------------------------------
def lars_gap(st) -> dict:
    """Reference settings, seeds: batch-128 baseline vs LARS at 1k with BN micro-batches of 128/64/512,
    and with LARS's trust ratio on BN and bias too (the rule detail the papers differ on)."""
    d, e = st.d, st.d.lars_gap_epochs
    base = [st.run("baseline", baseline_settings(st, s, e, 0.05), "lars-gap") for s in d.lars_gap_seeds]
    base_err = [r["final_error"] for r in base if r]
    rows = [{"config": "baseline 128 (2 x 64), LR 0.05 cosine", **(A.spread(base_err) if base_err else {})}]
    ref = {"warmup_epochs": 5.0, "power": 2.0} if d.paper_epochs else {}
    label = "LARS 1k = 2 x {} x {}, LR 25, warm-up 5, poly(2)"
    cases = [(bpr, {}, f"lars-gap-bn{bpr}", label.format(bpr, 1024 // (2 * bpr))) for bpr in d.lars_gap_bpr]
    noskip = "LARS 1k = 2 x 128 x 4, trust ratio and weight decay on BN and bias too"
    # the rule variant right after the reported run: BN micro-batch 64 (10.75% at seed 0 against
    # 9.67-10.80% at 128) did not look like the cause, so the rule detail is the next question
    cases[1:1] = [(128, v, "lars-gap-noskip", noskip) for v in d.lars_gap_rule_variants]
    for bpr, extra, name, config in cases:
        recs = [st.run(name, D.run_settings(d, "lars", 1024, s, 25.0, e, batch_per_rank=bpr,
                                             recipe_extra={**ref, **extra}), "lars-gap")
                for s in d.lars_gap_seeds]
        errs = [r["final_error"] for r in recs if r]
        row = {"config": config, "bpr": bpr, **({"rule": extra} if extra else {})}
        if errs:
            row.update(A.spread(errs))
            row["vs_reference_gap"] = A.gap_verdict(base_err, errs, REFERENCE["lars_gap"])
        rows.append(row)
    return {"epochs": e, "reference": REFERENCE, "rows": rows}


def run_part(st, name: str) -> dict:
    return {
        "budget-check": budget_check,
        "lars-gap": lars_gap,
        "fixed": fixed,
        "steps": steps,
        "akiba-bn": akiba_bn,
    }[name](st)
