"""``hpcsgd noise-scale``: a short probe run that measures B_noise and recommends a largest batch.

    hpcsgd noise-scale jobs/configs/fashion_mnist.yaml                 # one process, 200 steps
    hpcsgd noise-scale CONFIG.yaml --epochs 0.5 --micro-batches 4      # a fraction of an epoch
    mpiexec -n 4 hpcsgd noise-scale CONFIG.yaml --steps 300 --json

Why: the critical batch size tracks the gradient noise scale (McCandlish et
al. 2018), so a user can size a job before booking a cluster. The probe trains
the config's model on its data for the first ``--steps`` optimizer steps of
the configured schedule (same warm-up), with at least two micro-batches in
all (one process suffices: micro-batches are the second batch size), and
measures B_noise with :mod:`hpcsgd.train.noise_scale`.

Reported: the smoothed B_noise at the end (EMA), the ratio of means over the
second half of the probe's log intervals with its jackknife standard error,
and the range of the per-interval raw estimates. Recommendation: a global
batch of at most ``B_noise (second half) x --growth``, rounded down to a
multiple of ranks x micro-batch. At B = B_noise, training needs about twice
the minimum number of steps and twice the minimum number of examples
(McCandlish et al. eq. 2.11): the knee. B_noise grows as the loss falls, so
the probe's early value is a lower bound for later training and the default
``--growth 1`` is conservative (docs/noise_scale.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile

from hpcsgd.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (the keys of hpcsgd train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps to probe (default 200)")
    length.add_argument("--epochs", type=float, default=None, help="probe this fraction of an epoch instead")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per rank per step (default: the config's, at least 2 in all)")
    p.add_argument("--growth", type=float, default=1.0,
                   help="expected growth of B_noise over training applied to the recommendation (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, help="keep the probe's logs here (default: a temporary directory)")


def probe_config(args, size: int) -> dict:
    """The config the probe trains: the user's, with >= 2 micro-batches in all and no eval/checkpoints."""
    from hpcsgd.train import config as C
    from hpcsgd.train.checks import check_components

    if args.steps is not None and args.steps < 2:
        raise ConfigError(f"--steps must be >= 2, got {args.steps}")
    if args.epochs is not None and args.epochs <= 0:
        raise ConfigError(f"--epochs must be > 0, got {args.epochs}")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise ConfigError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    if not args.growth >= 1.0:
        raise ConfigError(f"--growth must be >= 1 (B_noise grows during training), got {args.growth}")
    cfg = C.merge(C.load_yaml(args.config), args.overrides)
    accum = args.micro_batches
    if accum is None:
        resolved = C.resolve(cfg, size, check_paths=False)
        accum = resolved["grad_accumulation"] if size * resolved["grad_accumulation"] >= 2 else 2
    if size * accum < 2:
        raise ConfigError("--micro-batches 1 on one rank: no second batch size to compare; use >= 2")
    cfg.update(grad_accumulation=accum, global_batch=None, noise_scale=True, eval_interval=0,
               checkpoint_interval=0, progress=False)
    cfg = C.resolve(cfg, size)
    check_components(cfg)
    return cfg


def _world() -> tuple[int, int]:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def main(args) -> int:
    from hpcsgd.train.cli import _select_blas

    _select_blas()
    rank, size = _world()
    try:
        cfg = probe_config(args, size)
    except ConfigError as e:
        if rank == 0:
            print(f"hpcsgd noise-scale: config error: {e}", file=sys.stderr)
        return 2
    import hpcsgd.runtime.abort

    hpcsgd.runtime.abort.install()  # an exception on one rank aborts the job, not leaving the others waiting
    out = args.out or tempfile.mkdtemp(prefix="hpcsgd-noise-")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the run's banner; stdout is the result
            result = run_probe(cfg, out, args)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    if rank == 0:
        print(json.dumps(result) if args.json else format_result(result))
    return 0


def run_probe(cfg: dict, out: str, args) -> dict:
    """Train the probe's steps; the result dict (identical on every rank)."""
    from hpcsgd.train.build import build_run

    run = build_run(cfg, out)
    try:
        steps = args.steps or 200
        if args.epochs is not None:
            steps = max(2, math.ceil(args.epochs * run.iters_per_epoch))
        steps = min(steps, run.total_iters)
        run.cfg = dict(cfg, stop_iteration=steps, log_interval=max(1, steps // 10))
        run.fit()
        final = run.noise.aggregate(run.comm)
    finally:
        run.close()
    records = []
    with open(os.path.join(out, f"log.rank{run.rank}.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("noise_scale", {}).get("raw_steps"):
                records.append(rec)
    return summarize(cfg, run, records, final, args.growth)


def summarize(cfg: dict, run, records: list[dict], final: dict, growth: float) -> dict:
    """B_noise (smoothed, second-half pooled with its jackknife error, per-interval range) and the advice."""
    from hpcsgd.train.noise_scale import ratio

    late = records[len(records) // 2:]
    g2 = [r["noise_scale"]["grad_sq_raw"] * r["noise_scale"]["raw_steps"] for r in late]
    tr = [r["noise_scale"]["trace_sigma_raw"] * r["noise_scale"]["raw_steps"] for r in late]
    pooled = ratio(sum(tr), sum(g2)) if late else None
    stderr = None
    if pooled is not None and len(late) >= 3:
        loo = [ratio(sum(tr) - t, sum(g2) - g) for t, g in zip(tr, g2)]
        if all(x is not None for x in loo):
            m, n = sum(loo) / len(loo), len(loo)
            stderr = math.sqrt((n - 1) / n * sum((x - m) ** 2 for x in loo))
    raw = [r["noise_scale"].get("b_noise_raw") for r in records]
    unit = cfg["world_size"] * cfg["batch_per_rank"]
    recommended = None
    if pooled is not None:
        recommended = max(unit, int(pooled * growth // unit) * unit)
    return {
        "model": cfg["model"], "dataset": cfg["dataset"], "ranks": cfg["world_size"],
        "micro_batches": cfg["grad_accumulation"], "b_small": final["b_small"], "b_big": final["b_big"],
        "steps": run.iteration, "epochs": run.epoch(), "ema_decay": cfg["noise_scale_ema"],
        "b_noise_smoothed": final.get("b_noise"), "b_noise_second_half": pooled,
        "b_noise_second_half_stderr": stderr,
        "b_noise_raw_intervals": raw, "growth": growth, "recommended_max_global_batch": recommended,
        "batch_unit": unit,
    }


def format_result(r: dict) -> str:
    def f(x):
        return "not resolved" if x is None else f"{x:,.0f}"

    raw = [x for x in r["b_noise_raw_intervals"] if x is not None]
    lines = [
        f"noise-scale probe: {r['model']} on {r['dataset']}, {r['steps']} steps ({r['epochs']:.3f} epochs), "
        f"B_small = {r['b_small']} (one micro-batch), B_big = {r['b_big']} "
        f"({r['ranks']} rank(s) x {r['micro_batches']} micro-batch(es))",
        f"B_noise smoothed (EMA {r['ema_decay']}) at the end: {f(r['b_noise_smoothed'])}",
        f"B_noise over the second half: {f(r['b_noise_second_half'])}"
        + (f" +- {r['b_noise_second_half_stderr']:,.0f} (jackknife s.e.)"
           if r["b_noise_second_half_stderr"] is not None else ""),
        f"per-interval raw estimates: {len(raw)} of {len(r['b_noise_raw_intervals'])} resolved"
        + (f", range {min(raw):,.0f} .. {max(raw):,.0f}" if raw else ""),
    ]
    b = r["b_noise_second_half"]
    if b is None:
        lines.append("no recommendation: the |G|^2 estimate is not positive, so B_noise is not resolved "
                     f"(it is likely well above B_big = {r['b_big']}); probe longer or with more "
                     "micro-batches")
        return "\n".join(lines)
    lines.append(f"recommended largest global batch: {r['recommended_max_global_batch']:,} "
                 f"(= B_noise x growth {r['growth']:g}, in multiples of {r['batch_unit']}); "
                 "B_noise grows as the loss falls, so this early value is a lower bound for later training")
    lines.append("predicted cost relative to the minimum (steps S/S_min = 1 + B_noise/B, examples "
                 "E/E_min = 1 + B/B_noise):")
    for mult in (0.25, 0.5, 1.0, 2.0, 4.0):
        batch = b * mult
        lines.append(f"  B = {batch:>10,.0f}: steps x{1 + b / batch:4.2f}, examples x{1 + batch / b:4.2f}")
    return "\n".join(lines)
