"""Training with the float16 wire made to behave like N simulated ranks: float32 vs both schemes.

Why: the wire's error at large N (benchmarks/fp16_wire.py) matters only if it
changes training. This runs the README main job (ResNet-8 width 8 on
Fashion-MNIST, Goyal recipe, 2 real ranks x 128 images) with ``hpcsgd train``
and the study-only communicator option ``wire_ranks=N``: the float16 wire divides
by ``N`` instead of the real world size before its cast and multiplies by
``N / 2`` after it, so every value on the wire is what one rank of an ``N``-rank
``flat`` job would cast (the ``hierarchical`` algorithm casts sums of 8 ranks, so
its ``N`` corresponds to ``8 N`` here). The two real ranks run as two one-rank
nodes (``HPCSGD_RANKS_PER_NODE=1``), so their mean crosses the float16 wire.

Runs, seed by seed: float32 wire, ``half_scaling=predivide`` (the old scheme) and
``chunk`` (the default) at each ``--nsim``. Each run's ``summary.json`` gives the loss
history and the final test top-1; this writes them together (JSON with a per-scheme
summary over seeds: mean, sd, min, max, and the paired difference to float32 of the
same seed; plot: mean loss per scheme with the min-max band over seeds).

    python benchmarks/fp16_wire_train.py --epochs 3 --seeds 0,1,2,3,4   # the main job's length
    python benchmarks/fp16_wire_train.py --epochs 3 --append --seed 5 --only "float32,chunk N=4096"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "jobs", "configs", "fashion_mnist.yaml")


def runs(nsim: list[int]) -> list[tuple[str, list[str]]]:
    """(label, --set overrides) of one seed: float32, then each float16 scheme at each N."""
    out = [("float32", ["wire_dtype=float32"])]
    for scheme in ("chunk", "predivide"):
        for n in nsim:
            opts = f"communicator_options={{half_scaling: {scheme}, wire_ranks: {n}}}"
            out.append((f"{scheme} N={n}", ["wire_dtype=float16", opts]))
    return out


def train(label: str, seed: int, sets: list[str], epochs: float, out: str, ranks: int,
          timeout: float) -> dict:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(ranks), sys.executable,
           "-m", "mpi4py", "-m", "hpcsgd", "train", CONFIG, "--out", out, "--set", f"epochs={epochs}",
           "--set", "checkpoint_interval=0", "--set", f"seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    # one rank per (virtual) node: the mean crosses the inter-node (float16) wire
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HPCSGD_RANKS_PER_NODE="1")
    t0, load0 = time.perf_counter(), os.getloadavg()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    if s["topology"]["nodes"] != ranks:
        raise RuntimeError(f"{label}: ran on {s['topology']['nodes']} nodes, not {ranks} one-rank nodes")
    rec = {"label": label, "seed": seed, "sets": sets, "top1": s["top1"], "iterations": s["iterations"],
           "skipped_steps": s["skipped_steps"], "wall_seconds": time.perf_counter() - t0,
           "loadavg": [load0, os.getloadavg()],
           "loss": [(h["iteration"], h["loss"]) for h in s["history"] if h.get("kind") == "train"]}
    last = [v for _, v in rec["loss"][-5:]]
    rec["final_loss_mean5"] = sum(last) / len(last) if last else None
    print(f"{label:18s} seed {seed}  top1 {rec['top1']:.4f}  "
          f"loss(last 5 logs) {rec['final_loss_mean5']:.4f}  "
          f"skipped {rec['skipped_steps']}  ({rec['wall_seconds']:.0f} s, load {load0[0]:.1f})", flush=True)
    return rec


def _seed_of(r: dict) -> int:
    """Seed of a record (older records carry it only in the label, 'float32 seed=1')."""
    if "seed" in r:
        return int(r["seed"])
    return int(r["label"].split("seed=")[1]) if "seed=" in r["label"] else 0


def _scheme_of(r: dict) -> str:
    return r["label"].split(" seed=")[0]


def summarize(runs_: list[dict]) -> dict:
    """Per scheme over seeds: mean, sample standard deviation, min, max of top-1 and final loss;
    and the paired difference to float32 (same seed) of the seeds both have."""
    by: dict = {}
    for r in runs_:
        by.setdefault(_scheme_of(r), {})[_seed_of(r)] = r
    f32 = by.get("float32", {})
    out = {}
    for scheme, recs in by.items():
        seeds = sorted(recs)
        row = {"seeds": seeds}
        for key in ("top1", "final_loss_mean5"):
            v = np.array([recs[k][key] for k in seeds], np.float64)
            row[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None,
                        "min": float(v.min()), "max": float(v.max())}
            paired = [recs[k][key] - f32[k][key] for k in seeds if k in f32]
            if scheme != "float32" and paired:
                d = np.array(paired)
                row[key]["minus_float32"] = {"mean": float(d.mean()), "n": int(d.size),
                                             "sd": float(d.std(ddof=1)) if d.size > 1 else None}
        row["skipped_steps"] = int(sum(recs[k]["skipped_steps"] for k in seeds))
        out[scheme] = row
    return out


def plot(res: dict, path: str) -> None:
    """Mean training loss per scheme over seeds, with the min-max band; legend: top-1 mean +- sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = {"float32": "black", "predivide": "tab:red", "chunk": "tab:blue"}
    styles = ["-", "--", ":", "-."]
    by: dict = {}
    for r in res["runs"]:
        if r["loss"]:
            by.setdefault(_scheme_of(r), []).append(r)
    for i, (scheme, recs) in enumerate(sorted(by.items())):
        n = min(len(r["loss"]) for r in recs)
        it = [x for x, _ in recs[0]["loss"][:n]]
        loss = np.array([[v for _, v in r["loss"][:n]] for r in recs])
        st = res["summary"][scheme]["top1"]
        sd = f" +- {100 * st['sd']:.2f}" if st["sd"] is not None else ""
        c = colors.get(scheme.split()[0], None)
        ax.plot(it, loss.mean(0), styles[i % 4], color=c,
                label=f"{scheme}: top-1 {100 * st['mean']:.2f}{sd}% ({len(recs)} seeds)")
        ax.fill_between(it, loss.min(0), loss.max(0), color=c, alpha=0.15)
    ax.set(xlabel="iteration (line: mean over seeds; band: min-max)",
           ylabel="training loss (logged mean)", yscale="log",
           title=f"ResNet-8 Fashion-MNIST, 2 ranks, float16 wire at simulated N ({res['epochs']} epochs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--nsim", default="4096", help="simulated ranks for the float16 runs")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--only", default=None, help="comma-separated labels of the runs to do (default: all)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; runs go seed by seed, so a "
                                               "study cut short has every scheme for its seeds")
    p.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds S)")
    p.add_argument("--append", action="store_true",
                   help="add to the existing --out JSON; runs it already has (label, seed) are skipped")
    p.add_argument("--out", default="benchmarks/results/fp16_wire_train.json")
    a = p.parse_args(argv)
    nsim = [int(x) for x in a.nsim.split(",")]
    seeds = [a.seed] if a.seed is not None else [int(x) for x in a.seeds.split(",")]
    res = {"config": CONFIG.replace(ROOT + os.sep, ""), "epochs": a.epochs, "ranks": a.ranks, "nsim": nsim,
           "note": "wire_ranks=N: each rank casts g/N (flat at N ranks); hierarchical's N is 8x this",
           "loadavg_start": os.getloadavg(), "runs": []}
    if a.append and os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
        if old["epochs"] != a.epochs:
            raise SystemExit(f"--append: {a.out} has {old['epochs']} epochs, not {a.epochs}")
        res["runs"], res["nsim"] = old["runs"], sorted(set(old["nsim"]) | set(nsim))
        res["loadavg_start"] = old.get("loadavg_start", res["loadavg_start"])
    have = {(_scheme_of(r), _seed_of(r)) for r in res["runs"]}
    todo = [(seed, lab, sets) for seed in seeds for lab, sets in runs(nsim)
            if (a.only is None or lab in a.only.split(",")) and (lab, seed) not in have]
    with tempfile.TemporaryDirectory(prefix="hpcsgd-fp16-train-") as tmp:
        for i, (seed, label, sets) in enumerate(todo):
            res["runs"].append(train(label, seed, sets, a.epochs, os.path.join(tmp, f"run{i}"), a.ranks,
                                     a.timeout))
            res["loadavg_end"] = os.getloadavg()
            res["summary"] = summarize(res["runs"])
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:  # after every run: a cut-short study keeps what it has
                json.dump(res, f, indent=1)
            plot(res, os.path.splitext(a.out)[0] + ".png")
    print(json.dumps(res.get("summary", {}), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
