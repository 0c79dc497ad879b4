"""The study's design: its settings, one run's ``hpcsgd train`` config, run identity and cost model.

Why here and not in the runner: everything that defines *what* is run is
pure and tested, so a changed grid or rule shows in review, and the cost of a
plan can be computed before a single run starts (``--plan``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

RECIPES = ("sgd", "goyal", "akiba", "lars")
LABELS = {
    "baseline": "baseline (momentum SGD, batch 128)",
    "sgd": "linear scaling",
    "goyal": "+ gradual warm-up (Goyal)",
    "akiba": "Akiba (RMSprop warm-up, slow start, batch BN)",
    "lars": "LARS (You: warm-up + poly(2))",
}
TRAIN_IMAGES = 60000
#: Akiba's slow-start LR milestones in the paper's 90-epoch run (its decay, scaled to the budget):
#: hpcsgd.schedules.lr.AKIBA_MILESTONES, one per factor 0.5 / 0.075 / 0.01 / 0.001 (the first at 0).
AKIBA_MILESTONES_90 = (0.0, 40.0, 70.0, 85.0)
#: Settings that do not change what a run computes: left out of its identity (cache key).
OPERATIONAL = ("checkpoint_interval", "keep_checkpoints", "progress", "loader_workers")


@dataclass
class Design:
    """All knobs of the study (defaults: the full study; :func:`quick` shrinks them)."""

    ranks: int = 2
    batch_per_rank: int = 64
    base_batch: int = 128
    batches: tuple = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # steps-to-target grid
    fixed_batches: tuple = (1024, 4096, 8192)  # fixed-epoch comparison (4096 = 32x the baseline)
    recipes: tuple = RECIPES
    lr_factors: tuple = (0.5, 1.0, 2.0)  # LR grid: factor x the recipe's own rule, per batch
    # when the grid's best (final error) sits at its edge, try one more factor beyond it (x2 above
    # the top, /2 below the bottom), up to this many times: an edge optimum means the grid, not the
    # recipe, limited the result (Shallue et al. extend their search space the same way)
    lr_extend: int = 3
    tune_seed: int = 0
    seeds: tuple = (0, 1)  # fixed-epoch part: seeds at the tuned LR (the tuning seed included)
    budget_epochs: tuple = (10.0, 20.0, 40.0)  # budget check: baseline at E and 2E
    budget_seeds: tuple = (0, 1)
    budget_tol: float = 0.3
    default_epochs: float = 20.0  # the budget when the budget check has not picked one
    epochs: float | None = None  # forced budget (None: the budget check's choice, else default_epochs)
    eval_interval: float = 0.5  # epochs between evaluations (at least every step)
    target_margin: float = 1.0  # target error = baseline's final error + this (points)
    tol: float = 1.0  # 'within 1 point'
    early_epochs: float = 2.0  # B_noise 'measured in the first epochs': epochs [0.25, this]
    depth: int = 8
    width: int = 8
    paper_epochs: bool = True  # warm-up lengths in paper epochs (False: scaled by epochs/90, quick only)
    akiba_bn_variants: tuple = ("batch", "batch-mean", "running")
    lars_gap_seeds: tuple = (0, 1, 2)
    lars_gap_epochs: float = 20.0
    lars_gap_bpr: tuple = (128, 64, 512)  # BN micro-batch per rank at 1k (128: the reported run)
    # LARS's rule detail: the trust ratio and weight decay on BN and bias too (the tech report's
    # "each learnable parameter") instead of the TF reference's skip list (at BN micro-batch 128)
    lars_gap_rule_variants: tuple = ({"skip_bn_bias": False},)
    # recipe options the comparison parts (fixed, steps) add per recipe. LARS: the trust ratio
    # and weight decay on BN and bias too, the form the LARS-gap part found to close the gap
    # (7.96 +- 0.05% over 3 seeds at 1k vs 10.31 +- 0.56% with the TF skip list; baseline 8.03)
    compare_extra: dict = field(default_factory=lambda: {"lars": {"skip_bn_bias": False}})
    # cost model: seconds per 60k-image epoch of a 2-rank run on 2 cores, per vector class of
    # the CPU (the direct convolution's register tiles differ). Measured 2026-12-02 on quiet
    # AMD EPYC VMs: Zen 5 (AVX-512), 20-epoch runs trained 196-224 s (10.5 s/epoch); Zen 3
    # (AVX2 only) 709-790 s launch to exit (37 s/epoch). None: the host's class.
    sec_per_epoch: float | None = None
    eval_seconds: float = 0.4  # one 10k-image evaluation
    startup_seconds: float = 12.0  # launch, imports, data load, final checkpoint
    extra: dict = field(default_factory=dict)


def quick(d: Design) -> Design:
    """A smoke design that exercises every part end-to-end with 7 short runs (not a result).

    Every part's code path runs (grid, seeds, target, budget check, plots), but
    the grid has one LR and one seed, so tuning and spreads are trivial.
    """
    d.batches, d.fixed_batches, d.recipes, d.lr_factors = (128, 512), (512,), ("sgd", "lars"), (1.0,)
    d.seeds, d.budget_epochs, d.budget_seeds = (0,), (0.05, 0.1), (0,)
    d.default_epochs, d.eval_interval, d.early_epochs = 0.05, 0.025, 0.05
    d.paper_epochs, d.akiba_bn_variants = False, ("batch", "running")
    d.lars_gap_seeds, d.lars_gap_epochs, d.lars_gap_bpr = (0,), 0.05, (128,)
    d.lars_gap_rule_variants = ()
    return d


def rule_lr(recipe: str, batch: int) -> float:
    """The recipe's own LR rule at ``batch``: 0.1 x B/256 (linear scaling), LARS: the reference table."""
    from hpcsgd import schedules as S

    if recipe == "lars":
        return S.lars_reference_peak(batch)[0]
    return S.linear_scaling_lr(batch)


def recipe_options(recipe: str, epochs: float, lr: float, paper_epochs: bool = True) -> dict:
    """``recipe_options`` of one run: warm-ups in paper epochs, decays over the run's budget.

    Why this split: the papers' claim is about the same number of *epochs*,
    so warm-up lengths keep their paper values (Goyal 5 epochs; LARS 5 up to
    16k; Akiba's RMSprop-to-SGD switch centred at epoch 10 over 5), while the
    decay must end with the run: cosine to 0 for linear scaling and Goyal (as
    the reference baseline), LARS's poly(2) to the last epoch, Akiba's slow
    start at 40/70/85 of 90 epochs scaled to the budget.
    """
    opts = {"lr": round(lr, 6)}
    if not paper_epochs:  # smoke runs shorter than a warm-up: the library's epochs/90 scaling
        if recipe in ("sgd", "goyal"):
            opts["decay"] = "cosine"
        return opts
    opts["scale_epochs"] = False
    if recipe in ("sgd", "goyal"):
        opts["decay"] = "cosine"
    elif recipe == "akiba":
        opts["milestones"] = [round(m * epochs / 90.0, 6) for m in AKIBA_MILESTONES_90]
    return opts


def run_settings(
    d: Design,
    recipe: str,
    batch: int,
    seed: int,
    lr: float,
    epochs: float,
    batch_per_rank: int | None = None,
    bn_mode: str | None = None,
    model_extra: dict | None = None,
    recipe_extra: dict | None = None,
) -> dict:
    """The ``--set`` overrides of one ``hpcsgd train`` run (everything that defines it)."""
    bpr = batch_per_rank or d.batch_per_rank
    per_step = d.ranks * bpr
    if batch % per_step:
        raise ValueError(f"batch {batch} is not a multiple of ranks x batch_per_rank = {per_step}")
    steps_per_epoch = iters_per_epoch(batch)
    if steps_per_epoch < 1:
        raise ValueError(f"batch {batch} exceeds the {TRAIN_IMAGES} training images")
    opts = recipe_options(recipe, epochs, lr, d.paper_epochs)
    opts.update(recipe_extra or {})
    return {
        "model": "resnet_small",
        "model_options": {"depth": d.depth, "width": d.width, **(model_extra or {})},
        "dataset": "fashion_mnist",
        "augment": False,
        "batch_per_rank": bpr,
        "global_batch": batch,
        "recipe": recipe,
        "recipe_options": opts,
        "bn_mode": bn_mode or ("batch" if recipe == "akiba" else "running"),
        "epochs": epochs,
        "eval_interval": eval_interval(d.eval_interval, steps_per_epoch),
        "seed": seed,
        "eval_batch": 500,
        "communicator": "hierarchical",
        "threads": 1,
        "log_interval": max(1, steps_per_epoch // 8),
        "loader_workers": 1,
        "progress": False,
        "keep_checkpoints": 1,
        "checkpoint_interval": max(1, steps_per_epoch),  # one per epoch: a killed run resumes
    }


def iters_per_epoch(batch: int) -> int:
    """Optimizer steps per epoch (the trainer drops the incomplete last batch)."""
    return TRAIN_IMAGES // batch


def eval_interval(interval_epochs: float, steps_per_epoch: int) -> float:
    """Evaluation interval in epochs, never shorter than one step (the trainer rounds to steps)."""
    return max(interval_epochs, 1.0 / steps_per_epoch)


def run_key(settings: dict) -> str:
    """A run's identity: a hash of the settings that change what it computes."""
    core = {k: v for k, v in settings.items() if k not in OPERATIONAL}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:10]


def run_name(label: str, settings: dict) -> str:
    return f"{label}-b{settings['global_batch']}-s{settings['seed']}-{run_key(settings)}"


#: seconds per epoch of the cost model by CPU vector class (see ``Design.sec_per_epoch``)
#: "other" (neither AVX2 nor AVX-512) is not measured: assumed no faster than AVX2
SEC_PER_EPOCH = {"avx512": 10.5, "avx2": 37.0, "other": 37.0}


def sec_per_epoch_and_source(d: Design, vector_class: str | None,
                             measured: float | None = None) -> tuple[float, str]:
    """The cost model's seconds per 60k-image epoch, from the most specific source there is,
    and that source ("design", "host" or "vector-class table").

    In order: the design's own figure (``--sec-per-epoch``); ``measured``, this host's figure
    from its own finished runs (:func:`measured_sec_per_epoch`); the class table. Why the host
    first: one vector class spans CPUs 2x apart (the Zen 5 VM's 10.5 s, a Zen 4 VM's 15.5 s, both AVX-512).
    """
    if d.sec_per_epoch is not None:
        return d.sec_per_epoch, "design"
    if measured is not None:
        return measured, "host"
    if vector_class not in SEC_PER_EPOCH:
        raise ValueError(f"cost model: no seconds per epoch for vector class {vector_class!r}; "
                         f"set Design.sec_per_epoch (--sec-per-epoch)")
    return SEC_PER_EPOCH[vector_class], "vector-class table"


def sec_per_epoch(d: Design, vector_class: str | None, measured: float | None = None) -> float:
    """The cost model's seconds per 60k-image epoch (:func:`sec_per_epoch_and_source`)."""
    return sec_per_epoch_and_source(d, vector_class, measured)[0]


def _images_and_evals(settings: dict, steps: int) -> tuple[float, int]:
    """(epochs' worth of images trained, evaluations) over ``steps`` steps of a run."""
    batch = settings["global_batch"]
    every = max(1, round(settings["eval_interval"] * iters_per_epoch(batch)))  # as the trainer rounds
    return steps * batch / TRAIN_IMAGES, -(-steps // every)  # the last one is the final evaluation


def measured_sec_per_epoch(d: Design, rec: dict) -> float:
    """One finished record's seconds per 60k-image epoch: :func:`run_cost_seconds` solved for it.

    The start-up and evaluation terms keep their design values, so the model reproduces the
    record's launch-to-exit seconds exactly.
    """
    images, evals = _images_and_evals(rec["settings"], rec["iterations_this_run"])
    return (rec["elapsed_s"] - d.startup_seconds - evals * d.eval_seconds) / images


def run_cost_seconds(d: Design, settings: dict, vector_class: str | None = None,
                     measured: float | None = None) -> float:
    """Predicted launch-to-exit seconds of a run on a quiet machine (the cost model).

    ``vector_class`` ("avx512", "avx2", "other": ``_machine.machine()``) and ``measured``
    (this host's seconds per epoch, if it has finished runs) pick the seconds per epoch as
    :func:`sec_per_epoch` does.

    Training time is proportional to the images actually trained (whole steps
    per epoch only), plus one evaluation per ``eval_interval`` and a fixed
    start-up; the per-image cost does not depend on the batch (accumulation
    keeps the per-rank micro-batch fixed).
    """
    steps = int(settings["epochs"] * iters_per_epoch(settings["global_batch"]) + 0.999999)
    images, evals = _images_and_evals(settings, steps)
    return d.startup_seconds + images * sec_per_epoch(d, vector_class, measured) + evals * d.eval_seconds
