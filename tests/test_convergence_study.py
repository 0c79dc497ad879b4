"""The convergence study's pure logic on synthetic records: target, steps to target, budget check,
aggregation, tuning pick, largest batch within 1 point, B_noise, the LARS-gap verdict, the run
settings (paper-epoch warm-ups), run identity, the cost model and the plan of parts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from convergence_study import analysis as A  # noqa: E402
from convergence_study import design as D  # noqa: E402
from convergence_study import parts as P  # noqa: E402
from convergence_study.runner import Study, read_run  # noqa: E402


def curve(points):
    return [{"iteration": it, "epoch": it / 100, "error": err} for it, err in points]


def test_steps_to_target_interpolates_between_the_evaluations_around_the_crossing():
    c = curve([(100, 30.0), (200, 20.0), (300, 10.0), (400, 8.0)])
    hit = A.steps_to_target(c, 15.0)
    assert hit["first_eval"] == 300
    assert hit["steps"] == pytest.approx(250.0)  # 20 -> 10 over 100 steps: 15 is half way
    assert A.steps_to_target(c, 30.0)["steps"] == 100.0  # reached at the first evaluation
    assert A.steps_to_target(c, 7.9) is None  # never reached


def test_choose_target_is_mean_plus_margin_rounded_up():
    assert A.choose_target([8.0, 8.25], 1.0) == pytest.approx(9.2)  # 9.125 -> 9.2
    assert A.choose_target([8.0, 8.2], 1.0) == pytest.approx(9.1)  # exactly 9.1 stays
    with pytest.raises(ValueError):
        A.choose_target([])


def test_budget_check_picks_the_smallest_converged_budget():
    res = A.budget_check({10: [9.0, 9.2], 20: [8.2, 8.4], 40: [8.0, 8.2]}, tol=0.3)
    assert [p["epochs"] for p in res["pairs"]] == [10, 20]
    assert res["pairs"][0]["difference"] == pytest.approx(0.8)
    assert not res["pairs"][0]["within_tol"] and res["pairs"][1]["within_tol"]
    assert res["chosen"] == 20
    assert A.budget_check({10: [9.0], 20: [8.0]}, tol=0.3)["chosen"] is None
    assert A.budget_check({10: [9.0]}, tol=0.3) == {"tol": 0.3, "pairs": [], "chosen": None}


def test_spread_and_best_run():
    s = A.spread([8.0, 9.0, 8.5])
    assert (s["mean"], s["spread"], s["half_spread"], s["n"]) == (8.5, 1.0, 0.5, 3)
    runs = [
        {"lr": 1, "final_error": 9.0, "s": None},
        {"lr": 2, "final_error": 8.0, "s": 50.0},
        {"lr": 4, "final_error": float("nan"), "s": 40.0},
    ]
    assert A.best_run(runs)["lr"] == 2  # nan (diverged) loses
    assert A.best_run(runs, "s")["lr"] == 4  # fewest steps; None (never reached) loses
    assert A.best_run([]) is None


def test_largest_batch_within_is_contiguous_and_flags_the_top_of_the_grid():
    errs = {256: 8.3, 512: 8.9, 1024: 9.5, 2048: 8.5}
    lb = A.largest_batch_within(errs, baseline_error=8.0, tol=1.0)
    assert {k: lb[k] for k in ("batch", "censored", "tol", "complete")} == {
        "batch": 512, "censored": False, "tol": 1.0, "complete": True}  # 1024 failed below 2048
    assert lb["bracket"] == {"within": 512, "out": 1024}  # 2048's lucky pass lies above the failure
    assert A.largest_batch_within({256: 8.1, 512: 8.2}, 8.0)["censored"] is True
    assert A.largest_batch_within({256: 12.0}, 8.0)["batch"] is None
    # with the design's grid: an unmeasured batch below the first failure leaves a lower bound only
    part = A.largest_batch_within({128: 8.0, 8192: 18.0}, 8.0, grid=(128, 256, 512, 8192))
    assert {k: part[k] for k in ("batch", "censored", "complete")} == {
        "batch": 128, "censored": False, "complete": False}
    assert part["bracket"] == {"within": 128, "out": 8192}
    assert A.prediction_check(200.0, part)["verdict"].startswith("pending")
    # measured cells already 5x above the early B_noise: a miss, whatever the unmeasured batches do
    # below them (if error grows with the batch)
    grid = (128, 256, 512, 1024, 2048, 4096)
    gap = A.largest_batch_within({128: 7.3, 1024: 8.0, 4096: 9.9}, 7.3, grid=grid)
    assert gap["batch"] == 128 and not gap["complete"] and gap["bracket"] == {"within": 1024, "out": 4096}
    pred = A.prediction_check(200.0, gap)
    assert pred["ratio"] == pytest.approx(1024 / 200) and pred["verdict"].startswith("no (from the measured")
    assert A.prediction_check(600.0, gap)["verdict"].startswith("pending")  # 1024 / 600 < 2: undecided
    done = A.largest_batch_within({128: 8.0, 256: 8.5, 512: 9.5}, 8.0, grid=(128, 256, 512, 8192))
    assert done["batch"] == 256 and done["complete"]  # 512 fails: 8192 unmeasured does not matter


def test_target_at_b_noise_is_pending_until_every_recipe_there_is_measured():
    rows = [{"batch": 8192, "vs_baseline": 10.7}, {"batch": 8192}, {"batch": 4096, "vs_baseline": 0.2}]
    assert P._any_within(rows, 8192, n_recipes=4, tol=1.0) is None
    four = [{"batch": 8192, "vs_baseline": v} for v in (10.7, 3.0, 1.5, 2.0)]
    assert P._any_within(four, 8192, n_recipes=4, tol=1.0) is False
    assert P._any_within(four[:2] + [{"batch": 8192, "vs_baseline": 0.9}], 8192, 4, 1.0) is True


def test_noise_windows_nearest_batch_and_prediction():
    series = [{"epoch": e / 4, "b_noise": 100.0 * (1 + e)} for e in range(0, 81)]  # epochs 0 .. 20
    nl = A.noise_early_late(series, epochs=20.0, early_end=2.0)
    assert nl["early"] == pytest.approx(statistics_median([100.0 * (1 + e) for e in range(1, 9)]))
    assert nl["late"] == pytest.approx(statistics_median([100.0 * (1 + e) for e in range(60, 81)]))
    assert A.noise_early_late([], 20.0) == {"early": None, "late": None}
    # at an epoch: the median of the points within 1 epoch (epochs 9..11: 100 x (37..45))
    assert A.noise_at_epoch(series, 10.0) == pytest.approx(100.0 * (1 + 40))
    assert A.noise_at_epoch(series, 30.0) is None
    combined = A.combine_noise([{"early": 100, "late": 900}, {"early": 300, "late": None}])
    assert combined == {"early": 200, "early_runs": 2, "late": 900, "late_runs": 1}
    assert A.nearest_batch([256, 512, 1024, 2048], 1500) == 2048  # log2: 1500 is nearer 2048 than 1024
    assert A.nearest_batch([256, 512], None) is None
    assert A.prediction_check(1000.0, {"batch": 2048, "censored": False})["verdict"] == "no"
    assert A.prediction_check(1100.0, {"batch": 2048, "censored": False})["verdict"] == "yes"
    assert A.prediction_check(1000.0, {"batch": 16384, "censored": True})["verdict"] == "at least"
    assert A.prediction_check(None, {"batch": 1024})["verdict"] == "unknown"


def statistics_median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def test_gap_verdict_uses_the_seeds_standard_error():
    base, lars = [8.0, 8.2, 8.1], [9.5, 9.6, 9.4]
    v = A.gap_verdict(base, lars, reference_gap=0.8)
    assert v["gap"] == pytest.approx(1.4)
    assert v["se"] == pytest.approx(math.sqrt(0.01 / 3 + 0.01 / 3))
    assert v["verdict"].startswith("differs")
    noisy = A.gap_verdict([7.5, 8.7], [8.9, 10.1], reference_gap=0.8)  # gap 1.4, se 0.6: consistent
    assert noisy["verdict"].startswith("consistent")
    assert A.gap_verdict([8.0], [9.0], 0.8)["verdict"] == "too few seeds"


def test_perfect_scaling_line():
    assert A.perfect_scaling([128, 256, 1024], 128, 4000) == [4000, 2000, 500]


def test_run_settings_keep_paper_warmups_and_scale_only_the_decay():
    d = D.Design()
    s = D.run_settings(d, "goyal", 1024, 1, D.rule_lr("goyal", 1024), 20.0)
    assert s["recipe_options"] == {"lr": 0.4, "scale_epochs": False, "decay": "cosine"}  # 5-epoch warm-up
    assert s["batch_per_rank"] == 64 and s["global_batch"] == 1024 and s["bn_mode"] == "running"
    a = D.run_settings(d, "akiba", 4096, 0, 1.6, 18.0)
    assert a["recipe_options"]["milestones"] == [0.0, 8.0, 14.0, 17.0] and a["bn_mode"] == "batch"
    assert D.rule_lr("lars", 8192) == 25.0
    with pytest.raises(ValueError, match="multiple"):
        D.run_settings(d, "sgd", 1000, 0, 0.1, 20.0)
    # the settings build a real schedule: Goyal's warm-up ends at epoch 5, not at 5 x 20/90
    from hpcsgd.schedules import build_recipe

    r = build_recipe("goyal", None, 1024, 20.0, D.iters_per_epoch(1024), **s["recipe_options"])
    assert r.hyperparams(4.9)["lr"] < 0.4 and r.hyperparams(5.0)["lr"] == pytest.approx(
        0.4 * 0.5 * (1 + math.cos(math.pi * 5 / 20))
    )


def test_eval_interval_is_at_least_one_step_and_keys_ignore_operational_settings():
    assert D.eval_interval(0.1, 3) == pytest.approx(1 / 3)
    assert D.eval_interval(0.5, 468) == 0.5
    d = D.Design()
    s = D.run_settings(d, "sgd", 128, 0, 0.05, 20.0)
    assert D.run_key(dict(s, checkpoint_interval=7, progress=True)) == D.run_key(s)
    assert D.run_key(dict(s, seed=1)) != D.run_key(s)


def test_cost_model_counts_whole_steps_and_evaluations():
    d = D.Design(sec_per_epoch=26.0, eval_seconds=1.5, startup_seconds=15.0)
    s = D.run_settings(d, "sgd", 128, 0, 0.05, 20.0)  # 468 steps/epoch, eval every 0.5 epoch
    assert D.run_cost_seconds(d, s) == pytest.approx(15 + 20 * 468 * 128 / 60000 * 26 + 40 * 1.5)
    s16 = D.run_settings(d, "lars", 16384, 0, 25.0, 20.0)  # 3 steps/epoch: 82% of the images per epoch
    # evaluation every round(0.5 x 3) = 2 steps: 30 over 60 steps
    assert D.run_cost_seconds(d, s16) == pytest.approx(15 + 60 * 16384 / 60000 * 26 + 30 * 1.5)


def test_cost_model_uses_the_seconds_measured_for_the_cpus_vector_class():
    d = D.Design(eval_seconds=0.0, startup_seconds=0.0)  # sec_per_epoch not set: per vector class
    s = D.run_settings(d, "sgd", 128, 0, 0.05, 1.0)  # 468 steps of 128 = 59,904 images
    images = 468 * 128 / 60000
    for cls, per_epoch in (("avx512", 10.5), ("avx2", 37.0), ("other", 37.0)):
        assert D.run_cost_seconds(d, dict(s, eval_interval=1.0), cls) == pytest.approx(images * per_epoch)
    with pytest.raises(ValueError, match="vector class None"):
        D.run_cost_seconds(d, s)
    # a design's own figure (--sec-per-epoch) wins over the class
    assert D.run_cost_seconds(D.Design(sec_per_epoch=5.0, eval_seconds=0.0, startup_seconds=0.0),
                              dict(s, eval_interval=1.0), "avx2") == pytest.approx(images * 5.0)


def test_records_name_the_cpu_by_family_and_vector_class_where_recorded():
    from convergence_study.runner import cpu_label

    zen3 = {"cpu_model": "AMD EPYC", "cpu_family": 25, "cpu_model_number": 1, "vector_class": "avx2"}
    assert cpu_label({"cpu_model": "AMD EPYC", "machine": zen3}) == "AMD EPYC (family 25 model 1, avx2)"
    assert cpu_label({"cpu_model": "AMD EPYC"}) == "AMD EPYC"  # records before the machine field
    assert cpu_label({}) == "?"

def fake_record(d, settings, error, label="x"):
    return {
        "key": D.run_key(settings),
        "name": D.run_name(label, settings),
        "label": label,
        "recipe": settings["recipe"],
        "batch": settings["global_batch"],
        "seed": settings["seed"],
        "lr": settings["recipe_options"]["lr"],
        "epochs": settings["epochs"],
        "settings": settings,
        "final_error": error,
        "evals": curve([(10, 50.0), (20, error)]),
        "noise": [],
        "elapsed_s": 60.0,
    }


def test_plan_counts_missing_runs_and_parts_read_cached_records(tmp_path):
    d = D.quick(D.Design())
    st = Study(d, tmp_path, mode="plan")
    P.budget_check(st)
    assert st.plan_cost()["runs"] == len(d.budget_epochs) * len(d.budget_seeds)
    # cache the budget runs: 0.05 and 0.1 epochs within tolerance -> the budget is 0.05 epochs
    runs = tmp_path / "runs"
    runs.mkdir()
    for e, err in ((0.05, 20.0), (0.1, 19.9)):
        s = P.baseline_settings(st, 0, e)
        (runs / f"{D.run_name('baseline', s)}.json").write_text(json.dumps(fake_record(d, s, err)))
    st = Study(d, tmp_path, mode="report")
    res = P.budget_check(st)
    assert res["chosen"] == 0.05 and P.study_epochs(st) == (0.05, True)
    assert st.cost()["runs"] == 2 and st.cost()["hours"] == pytest.approx(120 / 3600)


def test_read_run_dedupes_resumed_iterations_and_reads_b_noise(tmp_path):
    lines = [
        {"kind": "train", "iteration": 10, "epoch": 0.5, "loss": 1.0, "noise_scale": {"b_noise": 300.0}},
        {"kind": "eval", "iteration": 20, "epoch": 1.0, "top1": 0.5},
        {"kind": "eval", "iteration": 20, "epoch": 1.0, "top1": 0.6},  # repeated after a resume
        {"kind": "train", "iteration": 20, "epoch": 1.0, "loss": 0.5},
    ]
    (tmp_path / "log.rank0.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut")
    rec = read_run(tmp_path)
    assert [e["error"] for e in rec["evals"]] == [pytest.approx(40.0)]
    assert rec["noise"] == [{"iteration": 10, "epoch": 0.5, "b_noise": 300.0, "b_noise_raw": None}]
    assert rec["noise_summary"] is None and rec["completed"] is False  # no summary.json: degrade


class FakeStudy(Study):
    """A Study whose runs are synthesized from a known error model instead of launched."""

    def _execute(self, label, settings):
        b, seed, e = settings["global_batch"], settings["seed"], settings["epochs"]
        factor = settings["recipe_options"]["lr"] / D.rule_lr(settings["recipe"], b)
        doublings = max(0.0, math.log2(b / 256))
        slope = {"sgd": 0.8, "lars": 0.3}[settings["recipe"]]
        err = 8.0 + 0.2 * seed + slope * doublings + (0.4 if factor > 1 else 0.0) + (0.5 if e < 20 else 0.0)
        steps = int(e * D.iters_per_epoch(b))
        evals = [
            {"iteration": steps * k // 10, "epoch": e * k / 10, "error": err + 40.0 * (1 - k / 10)}
            for k in range(1, 11)
        ]
        noise = [
            {"iteration": i, "epoch": i / D.iters_per_epoch(b), "b_noise": 300.0 if i < steps / 2 else 600.0}
            for i in range(1, steps, max(1, steps // 40))
        ]
        rec = {
            "key": D.run_key(settings),
            "name": D.run_name(label, settings),
            "label": label,
            "recipe": settings["recipe"],
            "batch": b,
            "seed": seed,
            "lr": settings["recipe_options"]["lr"],
            "epochs": e,
            "settings": settings,
            "final_error": err,
            "evals": evals,
            "noise": noise,
            "elapsed_s": 100.0,
            "cpu_model": "fake",
            "loaded": False,
        }
        self.cache[rec["key"]] = rec
        return rec


def test_parts_aggregate_synthetic_records_into_the_targets(tmp_path):
    from convergence_study import report as R

    d = D.Design(
        batches=(128, 256, 512, 1024),
        fixed_batches=(512,),
        recipes=("sgd", "lars"),
        lr_factors=(1.0, 2.0),
        seeds=(0, 1),
        budget_epochs=(10.0, 20.0, 40.0),
        budget_seeds=(0, 1),
        lars_gap_seeds=(0, 1),
        lars_gap_bpr=(128,),
        akiba_bn_variants=(),
    )
    st = FakeStudy(d, tmp_path, log=lambda _m: None)
    res = {p: P.run_part(st, p) for p in ("budget-check", "fixed", "steps")}
    assert res["budget-check"]["chosen"] == 20.0  # 10 epochs: +0.5 points; 20 vs 40: equal
    fx = res["fixed"]
    assert fx["epochs"] == 20.0 and fx["budget_verified"]
    base = fx["rows"][0]
    assert base["recipe"] == "baseline" and base["lr"] == 0.05  # factor 1 beats factor 2
    assert base["mean"] == pytest.approx(8.1) and base["half_spread"] == pytest.approx(0.1)
    assert fx["b_noise"]["early"] == 300.0 and fx["b_noise"]["late"] == 600.0
    assert fx["batch_nearest_late_b_noise"] == 512
    lars512 = next(r for r in fx["rows"] if r["recipe"] == "lars" and r["batch"] == 512)
    assert lars512["vs_baseline"] == pytest.approx(0.3)  # one doubling above 256 at slope 0.3
    assert fx["target_within_1_at_b_noise"] is True
    sp = res["steps"]
    assert sp["target_error"] == pytest.approx(9.1)
    # sgd errors: 8.1 (128, 2 seeds), 8.0 (256), 8.8 (512, 2 seeds: 8.9), 9.6 (1024) -> within 1 up to 512
    assert sp["largest_within"]["sgd"]["batch"] == 512
    assert sp["largest_within"]["lars"]["batch"] == 1024 and sp["largest_within"]["lars"]["censored"]
    assert sp["largest_within"]["sgd"]["prediction"]["verdict"] == "yes"  # 512 / 300 < 2
    # the baseline reaches 9.1% at its last evaluation (epoch 20), where B_noise is 600
    assert sp["b_noise"]["at_target"] == 600.0
    at = sp["largest_within"]["sgd"]["prediction_at_target"]
    assert at["ratio"] == pytest.approx(512 / 600) and at["verdict"] == "yes"
    sgd = {p["batch"]: p for p in sp["curves"]["sgd"]}
    assert not sgd[1024]["reached"] and sgd[256]["reached"]  # 9.6 > 9.1 never reaches the target
    md = R.markdown(res, st.cost(), st.plan_cost())
    assert "MET" in md and "largest batch within 1 point 512" in md
    written = R.plots(res, {r["name"]: r for r in st.cache.values()}, tmp_path)
    assert set(written) == {"steps_to_target.png", "error_vs_batch.png", "curves.png"}
    # the driver merges parts read back from convergence.json (string keys) with fresh ones
    import json

    again = R.plots(json.loads(json.dumps(res)), {r["name"]: r for r in st.cache.values()}, tmp_path)
    assert set(again) == set(written)


def test_attempt_seconds_add_up_over_interrupted_attempts(tmp_path):
    from convergence_study.runner import _add_seconds

    assert _add_seconds(tmp_path, 30.0) == 30.0
    assert _add_seconds(tmp_path, 12.5) == 42.5  # the cost of a resumed run includes the cut attempt


def test_a_config_error_stops_the_study_instead_of_failing_every_run(tmp_path):
    """Exit 2 of ``hpcsgd train`` (config error) would repeat in every run: the study stops at once."""
    from convergence_study.runner import StudyAborted

    d = D.quick(D.Design())
    st = Study(d, tmp_path, mode="run", log=lambda *a: None)
    bad = dict(D.run_settings(d, "sgd", 128, 0, 0.05, 0.05), no_such_key=1)
    with pytest.raises(StudyAborted, match="config error"):
        st.run("baseline", bad, "budget-check")
    assert st.failures and st.failures[0]["exit_code"] == 2
    assert "no_such_key" in st.failures[0]["tail"]


def test_failures_in_a_row_stop_the_study(tmp_path, monkeypatch):
    """Runs that fail for another reason: the study stops after MAX_FAILURES_IN_A_ROW of them."""
    from convergence_study import runner

    monkeypatch.setattr(runner, "mpiexec", lambda: "false")  # every launch exits 1 at once
    d = D.quick(D.Design())
    st = Study(d, tmp_path, mode="run", log=lambda *a: None)
    for seed in range(runner.MAX_FAILURES_IN_A_ROW - 1):
        assert st.run("baseline", D.run_settings(d, "sgd", 128, seed, 0.05, 0.05), "p") is None
    with pytest.raises(runner.StudyAborted, match="failures in a row"):
        st.run("baseline", D.run_settings(d, "sgd", 128, 9, 0.05, 0.05), "p")


def test_code_version_names_the_commit():
    from convergence_study.runner import code_version

    v = code_version()
    assert v["commit"] is None or len(v["commit"]) == 40
    assert isinstance(v["hpcsgd_dirty"], bool)


class EdgeStudy(FakeStudy):
    """Final error falls with the LR up to 4x the rule, then rises: the optimum lies past the grid."""

    def _execute(self, label, settings):
        rec = super()._execute(label, settings)
        factor = settings["recipe_options"]["lr"] / D.rule_lr(settings["recipe"], settings["global_batch"])
        rec["final_error"] = 8.0 + abs(math.log2(factor) - 2.0) + (0.5 if settings["epochs"] < 20 else 0.0)
        return rec


def test_lr_grid_extends_past_an_edge_optimum_once(tmp_path):
    d = D.Design(recipes=("sgd",), lr_factors=(0.5, 1.0, 2.0), lr_extend=1, seeds=(0,))
    st = EdgeStudy(d, tmp_path, log=lambda _m: None)
    runs = P.grid(st, "sgd", 128, 20.0, "fixed")
    # 2x is the grid's best (9.0), so 4x runs (8.0) and wins; 8x is not tried (one extension)
    assert sorted(r["lr_factor"] for r in runs) == [0.5, 1.0, 2.0, 4.0]
    lr, tuned = P.tuned_lr(st, "sgd", 128, 20.0, "fixed")
    assert tuned and lr == pytest.approx(4 * D.rule_lr("sgd", 128))
    row = P.cell(st, "sgd", 128, 20.0, "fixed")
    assert row["grid"] == {"0.5": 11.0, "1.0": 10.0, "2.0": 9.0, "4.0": 8.0}
    assert row["lr_at_grid_edge"]  # the extension's 4x still wins: the optimum may lie further out
    d0 = D.Design(recipes=("sgd",), lr_factors=(0.5, 1.0, 2.0), lr_extend=0, seeds=(0,))
    st0 = EdgeStudy(d0, tmp_path / "no-extension", log=lambda _m: None)
    assert sorted(r["lr_factor"] for r in P.grid(st0, "sgd", 128, 20.0, "fixed")) == [0.5, 1.0, 2.0]
    # an interior optimum (factor 1 is best when the error is centred on it) adds nothing
    st1 = FakeStudy(D.Design(recipes=("sgd",), lr_factors=(0.5, 1.0, 2.0)), tmp_path / "interior",
                    log=lambda _m: None)
    st1._execute = lambda label, s: dict(FakeStudy._execute(st1, label, s), final_error=8.0 + abs(
        math.log2(s["recipe_options"]["lr"] / D.rule_lr("sgd", 128))))
    assert sorted(r["lr_factor"] for r in P.grid(st1, "sgd", 128, 20.0, "fixed")) == [0.5, 1.0, 2.0]
    assert not P.cell(st1, "sgd", 128, 20.0, "fixed")["lr_at_grid_edge"]


def test_budget_is_checked_again_at_the_tuned_lr_once_the_grid_exists(tmp_path):
    d = D.Design(recipes=("sgd",), lr_factors=(0.5, 1.0, 2.0), seeds=(0,), budget_seeds=(0, 1),
                 budget_epochs=(10.0, 20.0, 40.0))
    st = EdgeStudy(d, tmp_path, log=lambda _m: None)
    assert P.run_part(st, "budget-check")["at_tuned_lr"] is None  # nothing tuned yet
    P.grid(st, "sgd", 128, 20.0, "fixed")  # the fixed part's grid: best at 4x the rule
    bc = P.run_part(st, "budget-check")
    tl = bc["at_tuned_lr"]
    assert tl["lr"] == pytest.approx(4 * D.rule_lr("sgd", 128))
    assert [(p["epochs"], p["epochs_2x"], p["seeds"]) for p in tl["pairs"]] == [(20.0, 40.0, 2)]
    recs = [r for r in st.cache.values() if r["epochs"] == 40.0 and r["lr"] == pytest.approx(tl["lr"])]
    assert sorted(r["seed"] for r in recs) == [0, 1]


def test_every_run_the_parts_make_is_a_valid_train_config():
    """Each part's settings pass hpcsgd train's own checks (config and recipe), so no run of the
    study can fail at launch with a config error (Akiba's milestones once did, at batch 8192)."""
    from hpcsgd.schedules.lr import AKIBA_FACTORS, AKIBA_MILESTONES
    from hpcsgd.train import checks, config

    assert D.AKIBA_MILESTONES_90 == AKIBA_MILESTONES and len(AKIBA_FACTORS) == len(AKIBA_MILESTONES)
    d = D.Design()
    made = []
    for recipe in D.RECIPES:
        for batch in (128, 1024, 16384):
            lr, extra = D.rule_lr(recipe, batch), d.compare_extra.get(recipe)
            made.append(D.run_settings(d, recipe, batch, 0, lr, 20.0, recipe_extra=extra))
    for mode, extra in P.AKIBA_BN.values():
        made.append(D.run_settings(d, "akiba", 4096, 0, 1.6, 20.0, bn_mode=mode, model_extra=extra))
    for bpr in d.lars_gap_bpr:
        made.append(D.run_settings(d, "lars", 1024, 0, 25.0, 20.0, batch_per_rank=bpr,
                                   recipe_extra={"warmup_epochs": 5.0, "power": 2.0}))
    for settings in made:
        cfg = config.resolve({**config.defaults(), **settings}, world_size=d.ranks, check_paths=False)
        checks.check_recipe(cfg)


def test_cost_model_takes_this_hosts_own_quiet_whole_runs_first():
    from convergence_study.runner import host_sec_per_epoch

    d = D.Design(eval_seconds=0.5, startup_seconds=10.0)
    s = D.run_settings(d, "sgd", 1024, 0, 0.8, 20.0)  # 58 steps/epoch, eval every 29 steps: 40 evals
    images = 1160 * 1024 / 60000
    host = {"cpu_model": "AMD EPYC", "cpu_family": 25, "cpu_model_number": 17, "vector_class": "avx512",
            "cpus": 2}

    def rec(per_epoch, **kw):
        return dict({"settings": s, "iterations_this_run": 1160, "completed": True, "resumed": False,
                     "loaded": False, "machine": host, "elapsed_s": 10 + images * per_epoch + 40 * 0.5}, **kw)

    assert D.measured_sec_per_epoch(d, rec(17.0)) == pytest.approx(17.0)  # the model, solved for it
    other_cpu = dict(host, cpu_model_number=1, vector_class="avx2")
    records = [rec(16.0), rec(17.0), rec(30.0), rec(99.0, resumed=True), rec(99.0, loaded=True),
               rec(99.0, machine=other_cpu), {"settings": s, "elapsed_s": 1.0}]  # last: before 'machine'
    assert host_sec_per_epoch(d, records, host) == (pytest.approx(17.0), 3)  # median of the three
    assert host_sec_per_epoch(d, records[3:], host) == (None, 0)
    # the host's figure wins over the class table, the design's own over both
    assert D.sec_per_epoch(d, "avx512", 17.0) == 17.0
    assert D.sec_per_epoch(d, "avx512", None) == 10.5
    assert D.sec_per_epoch(D.Design(sec_per_epoch=5.0), "avx512", 17.0) == 5.0
    sources = [D.sec_per_epoch_and_source(dd, "avx512", m)[1]
               for dd, m in ((D.Design(sec_per_epoch=5.0), 17.0), (d, 17.0), (d, None))]
    assert sources == ["design", "host", "vector-class table"]
    assert D.run_cost_seconds(d, s, "avx512", 17.0) == pytest.approx(10 + images * 17 + 40 * 0.5)


def test_cli_subsets_narrow_the_design_and_reject_unknown_names():
    """--akiba-bn-variants (like --recipes and --fixed-batches) narrows the design it names; the
    default keeps every variant; an unknown name is an argparse error, not a silently empty part."""
    import convergence

    d = convergence.design_from(convergence.parse_args(["--akiba-bn-variants", "running", "batch-mean"]))
    assert d.akiba_bn_variants == ("running", "batch-mean")
    d = convergence.design_from(convergence.parse_args(["--recipes", "goyal", "--fixed-batches", "512"]))
    assert d.recipes == ("goyal",) and d.fixed_batches == (512,)
    assert d.akiba_bn_variants == D.Design().akiba_bn_variants == tuple(P.AKIBA_BN)
    with pytest.raises(SystemExit):
        convergence.parse_args(["--akiba-bn-variants", "moving"])
