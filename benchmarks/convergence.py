"""Large-minibatch convergence study on real data (Fashion-MNIST), one command.

    python benchmarks/convergence.py                 # tune, then the full study
    python benchmarks/convergence.py --quick         # a 2-minute smoke run of the machinery
    python benchmarks/convergence.py --report-only   # re-aggregate the stored runs

Every run is a real ``hpcsgd train`` job (``mpiexec -n RANKS``): the global
batch is reached with ranks plus gradient accumulation (``global_batch =
ranks x batch_per_rank x accumulation``). Accumulation gives exactly the
gradient of the larger batch; only BN differs (statistics are per micro-batch
of ``batch_per_rank`` images, i.e. as if every micro-batch were its own rank,
which is what the papers' 32-images-per-worker BN does).

Recipes at each large batch (``hpcsgd.optim.build_recipe``):

1. ``sgd``:   linear scaling alone (momentum SGD, LR 0.1*B/256, step decay);
2. ``goyal``: linear scaling + gradual warm-up (Goyal et al.);
3. ``akiba``: RMSprop warm-up + slow start + BN without moving averages (bn_mode 'batch');
4. ``lars``:  LARS + warm-up + polynomial decay (You et al.).

The baseline is ``sgd`` at ``--base-batch``. Epoch-valued settings of every
recipe are scaled from their 90-epoch paper values to the run's epochs
(``hpcsgd.optim.recipes``: e.g. Goyal's 5-epoch warm-up becomes 5/90 of the run).

Tuning (``--tune``, on by default): only what the papers tune, the base-LR
scale, on a grid of the same size for every recipe, at one large batch and
one seed; the best scale per recipe is then used at every batch and seed.

Metric: test top-1 error as the median of the last 3 evaluations of a run
(evaluations every ``--eval-interval`` epochs), then mean and spread
(max - min) over seeds. Each run's record is kept in
``OUT/runs/<run-id>.json`` (small), so a later change can be compared run by
run; existing records with the same settings are reused, which also makes an
interrupted study resumable. Outputs: ``OUT/convergence.json``,
``OUT/convergence.md`` (the table), ``OUT/error_vs_batch.png``,
``OUT/curves.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("sgd", "goyal", "akiba", "lars")
LABELS = {"sgd": "linear scaling", "goyal": "+ gradual warm-up (Goyal)",
          "akiba": "Akiba: RMSprop warm-up + slow start + BN w/o moving avg",
          "lars": "LARS + warm-up + poly decay (You)", "baseline": "baseline"}


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def default_lr(recipe: str, global_batch: int) -> float:
    """The recipe's own peak/base LR at ``global_batch`` (before the tuned scale)."""
    from hpcsgd import schedules as S

    if recipe == "lars":
        return S.lars_reference_peak(global_batch)[0]
    return S.linear_scaling_lr(global_batch)


def run_settings(args, recipe: str, batch: int, seed: int, lr_scale: float) -> dict:
    """The ``--set`` overrides of one run (everything that defines it)."""
    per_rank = args.batch_per_rank
    accumulation = batch // (args.ranks * per_rank)
    if accumulation * args.ranks * per_rank != batch:
        raise SystemExit(f"batch {batch} is not a multiple of ranks x batch_per_rank "
                         f"= {args.ranks * per_rank}")
    return {
        "model": "resnet_small", "model_options": {"depth": args.depth, "width": args.width},
        "dataset": "fashion_mnist", "batch_per_rank": per_rank, "global_batch": batch,
        "recipe": "sgd" if recipe == "baseline" else recipe,
        "recipe_options": {"lr": round(default_lr("sgd" if recipe == "baseline" else recipe, batch)
                                       * lr_scale, 6)},
        "bn_mode": "batch" if recipe == "akiba" else "running",
        "epochs": args.epochs, "eval_interval": args.eval_interval, "seed": seed,
        "augment": False, "loader_workers": 1, "threads": 1, "checkpoint_interval": 0, "progress": False,
        "log_interval": max(1, (60000 // batch) // 8), "eval_batch": 500, "communicator": "hierarchical",
    }


def run_id(recipe: str, batch: int, seed: int, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{recipe}-b{batch}-s{seed}-{digest}"


def read_run(out_dir: Path) -> dict:
    """Evaluation curve, train-loss curve and summary of a finished ``hpcsgd train`` run."""
    evals, losses = [], []
    with open(out_dir / "log.rank0.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            kind = rec.get("kind") or rec.get("event")
            if kind == "eval":
                evals.append({"epoch": rec["epoch"], "top1": rec["top1"]})
            elif kind == "train" and "loss" in rec:
                losses.append({"epoch": rec.get("epoch"), "loss": rec["loss"]})
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"evals": evals, "losses": losses, "wall_s": summary.get("wall_seconds"),
            "images_per_s": summary.get("images_per_s"), "iterations": summary.get("iterations"),
            "top1_final": summary.get("top1")}


def execute(args, recipe: str, batch: int, seed: int, lr_scale: float) -> dict:
    """Run (or reuse) one training job; returns its record."""
    settings = run_settings(args, recipe, batch, seed, lr_scale)
    rid = run_id(recipe, batch, seed, settings)
    record_path = args.out / "runs" / f"{rid}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    if args.report_only:
        return {}
    work = Path(tempfile.mkdtemp(prefix=f"hpcsgd-conv-{rid}-"))
    cmd = [mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train",
           str(ROOT / "jobs" / "configs" / "fashion_mnist.yaml"), "--out", str(work)]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    t0 = time.perf_counter()
    print(f"[convergence] {rid}: lr={settings['recipe_options']['lr']}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"run {rid} failed with exit code {proc.returncode}")
    rec = read_run(work)
    rec.update(recipe=recipe, batch=batch, seed=seed, lr_scale=lr_scale, settings=settings, run_id=rid,
               elapsed_s=time.perf_counter() - t0, metric_top1=final_metric(rec["evals"]))
    shutil.rmtree(work, ignore_errors=True)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(rec, indent=1))
    print(f"[convergence] {rid}: top-1 {rec['metric_top1']:.4f} in {rec['elapsed_s']:.0f} s", flush=True)
    return rec


def final_metric(evals: list[dict]) -> float:
    """Median test top-1 of the last 3 evaluations."""
    return statistics.median(e["top1"] for e in evals[-3:])


def tune(args) -> tuple[dict[str, float], list[dict]]:
    """Best base-LR scale per recipe at ``--tune-batch``, seed 0, same grid for every recipe.

    Returns the picks and the grid's run records.
    """
    best, records = {}, []
    for recipe in args.recipes:
        runs = {s: execute(args, recipe, args.tune_batch, 0, s) for s in args.lr_scales}
        records += runs.values()
        scores = {s: r.get("metric_top1", 0.0) for s, r in runs.items()}
        best[recipe] = max(scores, key=scores.get)
        print(f"[convergence] tuned {recipe}: scores {scores} -> lr scale {best[recipe]}", flush=True)
    return best, records


def study_cost(records: list[dict]) -> dict:
    """Distinct runs of the study and the sum of their launch-to-exit times (s)."""
    unique = {r["run_id"]: r for r in records if r}
    return {"runs": len(unique), "run_seconds": round(sum(r["elapsed_s"] for r in unique.values()), 1)}


def aggregate(records: list[dict]) -> list[dict]:
    rows = {}
    for r in records:
        if r:
            rows.setdefault((r["recipe"], r["batch"]), []).append(r)
    table = []
    order = {name: i for i, name in enumerate(("baseline",) + RECIPES)}
    for (recipe, batch), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99))):
        errs = [100.0 * (1.0 - r["metric_top1"]) for r in rs]
        table.append({"recipe": recipe, "batch": batch, "seeds": [r["seed"] for r in rs],
                      "lr_scale": rs[0]["lr_scale"], "lr": rs[0]["settings"]["recipe_options"]["lr"],
                      "error_mean": statistics.fmean(errs), "error_spread": max(errs) - min(errs),
                      "errors": errs, "steps": rs[0].get("iterations"),
                      "wall_s": statistics.fmean(r["wall_s"] or 0 for r in rs),
                      "images_per_s": statistics.fmean(r["images_per_s"] or 0 for r in rs)})
    return table


def markdown(table: list[dict], args, tuned: dict, cost: dict) -> str:
    lines = [f"Fashion-MNIST, ResNet-{args.depth} (width {args.width}), {args.epochs:g} epochs, "
             f"{args.ranks} ranks x {args.batch_per_rank} images x accumulation; test top-1 error (%) = "
             f"median of the last 3 evaluations, mean ± spread (max-min) over seeds {args.seeds}.",
             (f"Tuned: base-LR scale from {args.lr_scales} at batch {args.tune_batch}, seed 0: {tuned}."
              if args.tune else "Not tuned in this run: every recipe at its paper LR rule (scale 1.0)."),
             f"Whole study (tuning included): {cost['runs']} runs, {cost['run_seconds'] / 60:.0f} min of "
             "run time on this machine (sum of the runs' wall times, launch to exit).", "",
             "| batch | recipe | LR | steps | seeds run | error % | spread | images/s | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['batch']} | {LABELS.get(row['recipe'], row['recipe'])} | {row['lr']:g} | "
                     f"{row.get('steps') or ''} | "
                     f"{','.join(map(str, row['seeds']))} | "
                     f"{row['error_mean']:.2f} | ±{row['error_spread'] / 2:.2f} | "
                     f"{row['images_per_s']:.0f} | {row['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], records: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = [r for r in table if r["recipe"] == "baseline"]
    if base:
        ax.axhline(base[0]["error_mean"], color="gray", ls="--", label=f"baseline (batch {base[0]['batch']})")
    for recipe in args.recipes:
        rows = [r for r in table if r["recipe"] == recipe]
        if rows:
            ax.errorbar([r["batch"] for r in rows], [r["error_mean"] for r in rows],
                        yerr=[r["error_spread"] / 2 for r in rows], marker="o", capsize=3,
                        label=LABELS[recipe])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (images)")
    ax.set_ylabel("test top-1 error (%)")
    ax.set_title("Fashion-MNIST: error vs batch size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "error_vs_batch.png", dpi=120)

    largest = max(args.batches)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in records:
        if r and r["seed"] == args.seeds[0] and (r["batch"] == largest or r["recipe"] == "baseline"):
            label = f"{LABELS[r['recipe']]} (batch {r['batch']})"
            axes[0].plot([e["epoch"] for e in r["evals"]], [100 * (1 - e["top1"]) for e in r["evals"]],
                         marker=".", label=label)
            if r["losses"]:
                axes[1].plot([p["epoch"] for p in r["losses"]], [p["loss"] for p in r["losses"]], label=label)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test top-1 error (%)")
    axes[0].set_ylim(top=40)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("training loss")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"Training curves, seed {args.seeds[0]}")
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "convergence")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch-per-rank", type=int, default=64)
    p.add_argument("--base-batch", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--eval-interval", type=float, default=0.5)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tune-batch", type=int, default=4096)
    p.add_argument("--lr-scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--run-timeout", type=float, default=1800)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny smoke study (not a result)")
    args = p.parse_args(argv)
    if args.quick:
        args.out = args.out.parent / "convergence_quick"
        args.batches, args.seeds, args.epochs, args.tune = [512], [0], 0.5, False
        args.recipes, args.eval_interval = ["goyal", "akiba"], 0.125
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tuned, tune_runs = tune(args) if args.tune else ({r: 1.0 for r in args.recipes}, [])
    records = []
    for seed in args.seeds:  # seed-major: an interrupted study still has whole grids
        records.append(execute(args, "baseline", args.base_batch, seed, 1.0))
        for batch in args.batches:
            records += [execute(args, recipe, batch, seed, tuned[recipe]) for recipe in args.recipes]
    table = aggregate(records)
    cost = study_cost(tune_runs + records)
    settings = {k: (os.path.relpath(v, ROOT) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "convergence.json").write_text(json.dumps(
        {"settings": settings,
         "tuned_lr_scale": tuned, "study_cost": cost, "table": table, "loadavg": os.getloadavg()}, indent=1))
    md = markdown(table, args, tuned, cost)
    (args.out / "convergence.md").write_text(md)
    plot(table, records, args)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
