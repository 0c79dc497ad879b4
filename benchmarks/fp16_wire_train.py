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

Runs: float32 wire (seeds 0 and 1: the spread of the same job); ``half_scaling=predivide``
(the old scheme) and ``chunk`` (the default) at each ``--nsim``. Each run's
``summary.json`` gives the loss history and the final test top-1; this writes them
together (JSON + plot).

    python benchmarks/fp16_wire_train.py --epochs 1          # about 234 steps per run
    python benchmarks/fp16_wire_train.py --epochs 3          # the main job's full length
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "jobs", "configs", "fashion_mnist.yaml")


def runs(nsim: list[int]) -> list[tuple[str, list[str]]]:
    """(label, --set overrides); 'float32 seed=1' shows the run-to-run spread of the same job."""
    out = [("float32", ["wire_dtype=float32"]), ("float32 seed=1", ["wire_dtype=float32", "seed=1"])]
    for scheme in ("predivide", "chunk"):
        for n in nsim:
            opts = f"communicator_options={{half_scaling: {scheme}, wire_ranks: {n}}}"
            out.append((f"{scheme} N={n}", ["wire_dtype=float16", opts]))
    return out


def train(label: str, sets: list[str], epochs: float, out: str, ranks: int, timeout: float) -> dict:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(ranks), sys.executable,
           "-m", "mpi4py", "-m", "hpcsgd", "train", CONFIG, "--out", out, "--set", f"epochs={epochs}",
           "--set", "checkpoint_interval=0"]
    for s in sets:
        cmd += ["--set", s]
    # one rank per (virtual) node: the mean crosses the inter-node (float16) wire
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HPCSGD_RANKS_PER_NODE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    if s["topology"]["nodes"] != ranks:
        raise RuntimeError(f"{label}: ran on {s['topology']['nodes']} nodes, not {ranks} one-rank nodes")
    rec = {"label": label, "sets": sets, "top1": s["top1"], "iterations": s["iterations"],
           "skipped_steps": s["skipped_steps"], "wall_seconds": time.perf_counter() - t0,
           "loss": [(h["iteration"], h["loss"]) for h in s["history"] if h.get("kind") == "train"]}
    last = [v for _, v in rec["loss"][-5:]]
    rec["final_loss_mean5"] = sum(last) / len(last) if last else None
    print(f"{label:18s} top1 {rec['top1']:.4f}  loss(last 5 logs) {rec['final_loss_mean5']:.4f}  "
          f"skipped {rec['skipped_steps']}  ({rec['wall_seconds']:.0f} s)", flush=True)
    return rec


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = {"float32": "black", "predivide": "tab:red", "chunk": "tab:blue"}
    for r in res["runs"]:
        it, loss = zip(*r["loss"]) if r["loss"] else ((), ())
        seed = int(r["label"].split("seed=")[1]) if "seed=" in r["label"] else 0
        n4096 = "N=1024" not in r["label"]
        ax.plot(it, loss, ["-", "--", ":", "-."][seed % 4], color=colors[r["label"].split()[0]],
                alpha=1.0 if n4096 else 0.45, label=f"{r['label']} (top-1 {100 * r['top1']:.2f}%)")
    ax.set(xlabel="iteration (colour: wire; line style: seed; faint: N=1024)",
           ylabel="training loss (logged mean)", yscale="log",
           title=f"ResNet-8 Fashion-MNIST, 2 ranks, float16 wire at simulated N ({res['epochs']} epochs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--nsim", default="1024,4096", help="simulated ranks for the float16 runs")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--only", default=None, help="comma-separated labels of the runs to do (default: all)")
    p.add_argument("--append", action="store_true", help="add the runs to the existing --out JSON")
    p.add_argument("--seed", type=int, default=None, help="run the selected runs with this seed instead")
    p.add_argument("--out", default="benchmarks/results/fp16_wire_train.json")
    a = p.parse_args(argv)
    nsim = [int(x) for x in a.nsim.split(",")]
    res = {"config": CONFIG.replace(ROOT + os.sep, ""), "epochs": a.epochs, "ranks": a.ranks, "nsim": nsim,
           "note": "wire_ranks=N: each rank casts g/N (flat at N ranks); hierarchical's N is 8x this",
           "loadavg_start": os.getloadavg(), "runs": []}
    if a.append and os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
        if old["epochs"] != a.epochs:
            raise SystemExit(f"--append: {a.out} has {old['epochs']} epochs, not {a.epochs}")
        res["runs"], res["nsim"] = old["runs"], sorted(set(old["nsim"]) | set(nsim))
    with tempfile.TemporaryDirectory(prefix="hpcsgd-fp16-train-") as tmp:
        todo = [r for r in runs(nsim) if a.only is None or r[0] in a.only.split(",")]
        if a.seed is not None:  # another sample of the same runs
            todo = [(f"{lab} seed={a.seed}", sets + [f"seed={a.seed}"]) for lab, sets in todo]
        for i, (label, sets) in enumerate(todo):
            res["runs"].append(train(label, sets, a.epochs, os.path.join(tmp, f"run{i}"), a.ranks, a.timeout))
            res["loadavg_end"] = os.getloadavg()
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:  # after every run: a cut-short study keeps what it has
                json.dump(res, f, indent=1)
            plot(res, os.path.splitext(a.out)[0] + ".png")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
