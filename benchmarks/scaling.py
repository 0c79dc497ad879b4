"""Weak-scaling step benchmark: per-phase breakdown, images/s, T1/TN, hpcsgd vs ChainerMN.

    python benchmarks/scaling.py                       # resnet_small + resnet50, 1 and 2 ranks
    python benchmarks/scaling.py --cluster             # + 4 ranks on the emulated 2-host cluster
    python benchmarks/scaling.py --models resnet_small --iters 6 --quick

Every configuration runs as its own ``mpiexec -n N`` job of this file in worker
mode (``benchmarks/_scaling_worker.py``), one thread per rank (OMP/OpenBLAS/numba =
1, ``OPENBLAS_CORETYPE=SkylakeX`` as the brief says, recorded with threadpoolctl).
Data are synthetic arrays made before the loop (no I/O), so ``data_wait`` is the cost of handing over a batch.

Frameworks, same model, same kernels, same run:

* ``hpcsgd``: ``hpcsgd.create_communicator('hierarchical')`` +
  ``hpcsgd.create_multi_node_optimizer`` (pack / allreduce / unpack / update traced
  by the communicator and optimizer themselves);
* ``hpcsgd-overlap``: ``hpcsgd.comm.overlap.OverlappedReducer`` (buckets reduced
  during backward), then the plain optimizer update; ``hpcsgd-nooverlap`` is the
  same reducer with ``overlap=False`` (the in-run baseline);
* ``chainermn``: ``chainermn.create_communicator('naive')`` +
  ``chainermn.create_multi_node_optimizer``; its ``multi_node_mean_grad`` is
  timed as ``allreduce`` (pack/unpack are inside it), the rest of ``update`` as update.

Per configuration: median over the timed iterations of rank 0's iteration wall
time and of each phase; images/s = ranks x batch / iteration; weak-scaling
efficiency T1/TN against the 1-rank run of the same model and framework.
Output: ``benchmarks/results/scaling.json`` and ``scaling.png`` (stacked bars
per configuration + efficiency curves); the calibrated performance model's
error on these measurements is stored in the JSON under ``model_check``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._machine import machine  # noqa: E402
from benchmarks._scaling_worker import COMM_PHASES, PHASES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHORT = {"hpcsgd": "hpcsgd", "hpcsgd-nooverlap": "buckets", "hpcsgd-overlap": "buckets+overlap",
         "chainermn": "ChainerMN"}

#: model -> (build kwargs, image size, per-rank batch, classes). Spatial sizes are small for the CPU:
#: ResNet-50 at 64 px (not 224) keeps one iteration around a second on one core.
MODELS = {
    "resnet_small": ({"depth": 20, "width": 16}, 32, 32, 10),
    "resnet50": ({}, 64, 8, 1000),
}
QUICK = {"resnet_small": ({"depth": 8, "width": 8}, 16, 16, 10), "resnet50": ({}, 32, 2, 100)}


# ----------------------------------------------------------------------------- driver
def _mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def bench_env(extra: dict | None = None) -> dict:
    """Each job's environment: one thread per rank, OpenBLAS pinned to this CPU's best kernel."""
    from hpcsgd.blas import cpu_coretype

    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    coretype = cpu_coretype()  # SkylakeX on AVX-512, Haswell on AVX2 (a fixed SkylakeX is SIGILL there)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p])
    env.update(extra or {})
    return env


def run_config(model: str, framework: str, ranks: int, spec, args, cluster=None) -> dict | None:
    """One mpiexec job; returns its JSON record or None (printing why) on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        worker_argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model,
                       "--framework", framework, "--communicator", args.communicator,
                       "--spec", json.dumps(spec), "--iters", str(args.iters), "--warmup", str(args.warmup),
                       "--json", out]
        if args.timeline:
            tl = f"{args.timeline}_{model}_{framework}_{ranks}r{'_cluster' if cluster else ''}.json"
            worker_argv += ["--timeline", tl, "--timeline-iters", args.timeline_iters]
        env = bench_env()
        mpi_args = ["-n", str(ranks)]
        if cluster is not None:
            mpi_args = ["-n", str(ranks), *cluster.mpiexec_args(ranks // cluster.n_hosts)]
            env.update(cluster.env())
            env["HPCSGD_BENCH_NODES"] = str(cluster.n_hosts)
        cmd = [_mpiexec(), *mpi_args, *worker_argv]
        t0 = time.time()
        try:
            res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"  {model} {framework} n={ranks}: TIMEOUT after {args.timeout} s", flush=True)
            return None
        if res.returncode != 0 or not os.path.exists(out):
            tail = (res.stdout + res.stderr)[-1500:]
            print(f"  {model} {framework} n={ranks}: FAILED rc={res.returncode}\n{tail}", flush=True)
            return None
        rec = json.load(open(out))
        rec["job_seconds"] = time.time() - t0
        ph = rec["phases_s"]
        print(f"  {model:12s} {framework:16s} n={ranks} iter {rec['iteration_s'] * 1e3:8.1f} ms  "
              f"{rec['images_per_s']:7.1f} img/s  fwd {ph.get('forward', 0) * 1e3:.0f} bwd "
              f"{ph.get('backward', 0) * 1e3:.0f} comm "
              f"{sum(ph.get(k, 0) for k in COMM_PHASES) * 1e3:.1f} upd {ph.get('update', 0) * 1e3:.1f} ms  "
              f"load {rec['loadavg_before'][0]:.1f}", flush=True)
        return rec


def _available_frameworks(wanted: list[str]) -> list[str]:
    ok = []
    for fw in wanted:
        try:
            if fw == "chainermn":
                import chainermn  # noqa: F401
            else:
                from hpcsgd.comm import communicator_class

                communicator_class("hierarchical")
                if fw != "hpcsgd":
                    import hpcsgd.comm.overlap  # noqa: F401
            ok.append(fw)
        except Exception as e:
            print(f"skipping framework {fw}: {type(e).__name__}: {e}")
    return ok


def median_record(recs: list[dict]) -> list[dict]:
    """The record with the median iteration time, carrying every repeat's time and load."""
    if not recs:
        return []
    ranked = sorted(recs, key=lambda r: r["iteration_s"])
    best = dict(ranked[(len(ranked) - 1) // 2])
    best["iteration_s_repeats"] = [r["iteration_s"] for r in recs]
    best["loadavg_repeats"] = [r["loadavg_before"][0] for r in recs]
    return [best]


def add_efficiency(configs: list[dict]) -> None:
    """T1/TN per model and framework, the speed-up over ChainerMN, and the step efficiency.

    ``step_efficiency`` = (data_wait + forward + backward + update) / iteration of the same
    job: the share of the step that is not exposed communication. Unlike T1/TN it does not
    move when other jobs steal CPU between the 1-rank and the N-rank job.
    """
    base = {(c["model"], c["framework"]): c["iteration_s"] for c in configs if c["ranks"] == 1}
    for c in configs:
        t1 = base.get((c["model"], c["framework"]))
        c["efficiency"] = t1 / c["iteration_s"] if t1 else None
        ph = c["phases_s"]
        c["comm_s"] = sum(ph.get(k, 0.0) for k in COMM_PHASES)
        c["step_efficiency"] = sum(ph.get(k, 0.0) for k in ("data_wait", "forward", "backward", "update")) \
            / c["iteration_s"]
    ref = {(c["model"], c["ranks"], c["nodes"]): c["iteration_s"]
           for c in configs if c["framework"] == "chainermn"}
    for c in configs:
        r = ref.get((c["model"], c["ranks"], c["nodes"]))
        c["speedup_vs_chainermn"] = r / c["iteration_s"] if r else None


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = data["configs"]
    models = sorted({c["model"] for c in configs})
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * len(models) + 5, 5))
    colors = dict(zip(PHASES + ("other",), plt.cm.tab10.colors))
    for ax, model in zip(axes, models):
        mine = [c for c in configs if c["model"] == model]
        labels = [f"{SHORT.get(c['framework'], c['framework'])}\n{c['ranks']}r/{c['nodes']}n" for c in mine]
        bottom = [0.0] * len(mine)
        for ph in PHASES + ("other",):
            vals = [max(0.0, c["other_s"] if ph == "other" else c["phases_s"].get(ph, 0.0)) * 1e3
                    for c in mine]
            ax.bar(range(len(mine)), vals, bottom=bottom, color=colors[ph], label=ph)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(mine)), labels, fontsize=7, rotation=35)
        ax.set(ylabel="ms per iteration (median, rank 0)",
               title=f"{model} (batch {mine[0]['per_rank_batch']}/rank, {mine[0]['image_size']} px)")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for model in models:
        for fw in sorted({c["framework"] for c in configs}):
            pts = sorted((c["ranks"], c["efficiency"]) for c in configs
                         if c["model"] == model and c["framework"] == fw and c["efficiency"])
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {fw}")
                se = sorted((c["ranks"], c["step_efficiency"]) for c in configs
                            if c["model"] == model and c["framework"] == fw and c.get("step_efficiency"))
                ax.plot([p[0] for p in se], [p[1] for p in se], ls=":", marker="x", color=line.get_color())
    top = max([1.15] + [1.05 * c["efficiency"] for c in configs if c.get("efficiency")])
    ax.set(xlabel="ranks (1 thread each)", ylabel="T1/TN (solid); step efficiency (dotted)", ylim=(0, top),
           title=f"load avg {data['loadavg_start'][0]:.1f} -> {data['loadavg_end'][0]:.1f} (2 cores)")
    ax.set_xticks(sorted({c["ranks"] for c in configs}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def driver(args: argparse.Namespace) -> int:
    specs = QUICK if args.quick else MODELS
    frameworks = _available_frameworks(args.frameworks.split(","))
    if not frameworks:
        print("no framework available; nothing to run")
        return 1
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_start": os.getloadavg(), "repeats": args.repeats,
            "cpus": os.cpu_count(), "machine": machine(), "iters": args.iters, "warmup": args.warmup,
            "note": "synthetic data, 1 thread per rank, OPENBLAS_CORETYPE=SkylakeX; machine shared with "
                    "other jobs (see loadavg per config); ResNet-50 at reduced spatial size for the CPU",
            "configs": []}
    # Round-robin repeats: every configuration once per round, so load changes hit all alike;
    # each configuration reports the job with the median iteration time.
    plan = [(model, ranks, fw) for model in args.models.split(",")
            for ranks in [int(r) for r in args.ranks.split(",")] for fw in frameworks]
    runs: dict[tuple, list[dict]] = {}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        for model, ranks, fw in plan:
            rec = run_config(model, fw, ranks, specs[model], args)
            if rec:
                runs.setdefault((model, ranks, fw), []).append(rec)
        data["configs"] = [rec for key in plan for rec in median_record(runs.get(key, []))]
        data["rounds_done"] = r + 1
        finish(data, args)  # a partial result survives an interrupted run
    if args.cluster:
        _cluster_runs(args, specs, frameworks, data)
        finish(data, args)
    return 0


def finish(data: dict, args: argparse.Namespace) -> None:
    """Efficiency, model check, JSON and plot of what has been measured so far."""
    add_efficiency(data["configs"])
    data["loadavg_end"] = os.getloadavg()
    try:
        from hpcsgd.perfmodel.calibrate import load_calibration, measured_overlap
        from hpcsgd.perfmodel.checks import model_errors

        cal = load_calibration(RESULTS / "predict_calibration.json")
        overlap = measured_overlap(RESULTS / "overlap.json") or 0.0
        data["model_check"] = model_errors(data, cal, overlap)
        for r in data["model_check"]:
            print(f"  model check {r['model']} {r['framework']} n={r['ranks']}: "
                  f"measured {r['measured_s'] * 1e3:.1f} ms, "
                  f"predicted {r['predicted_s'] * 1e3:.1f} ms ({r['error']:+.1%})")
    except Exception as e:
        data["model_check_error"] = f"{type(e).__name__}: {e}"
        print("model check failed:", data["model_check_error"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    if data["configs"]:
        plot(data, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and .png", flush=True)


def _wait_for_cluster_lock(seconds: float) -> bool:
    """Wait until no other job holds tests/cluster's namespace lock (EmulatedCluster.up blocks on it)."""
    import fcntl

    from cluster.netns import LOCK_PATH

    deadline = time.time() + seconds
    while True:
        try:
            fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True  # no lock file possible: let up() report the problem
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
        except BlockingIOError:
            if time.time() > deadline:
                return False
            time.sleep(5)
        finally:
            os.close(fd)


def _cluster_runs(args, specs, frameworks, data) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from cluster.netns import EmulatedCluster, unavailable_reason
    except Exception as e:
        print(f"4-rank emulated cluster skipped: tests/cluster not importable ({e})")
        return
    reason = unavailable_reason()
    if reason:
        print(f"4-rank emulated cluster skipped: {reason}")
        return
    if not _wait_for_cluster_lock(args.cluster_wait):
        print(f"4-rank emulated cluster skipped: namespace lock busy for {args.cluster_wait} s")
        data["cluster_skipped"] = "namespace lock busy"
        return
    print("4 ranks on the emulated 2-host cluster (2 ranks per host; 4 ranks on 2 cores: oversubscribed, "
          "shows the communication structure, not a timing claim)")
    cluster_fws = [f for f in args.cluster_frameworks.split(",") if f in frameworks]
    with EmulatedCluster(n_hosts=2) as cl:
        for model in args.cluster_models.split(","):
            for fw in cluster_fws:
                rec = run_config(model, fw, 4, specs[model], args, cluster=cl)
                if rec:
                    rec["oversubscribed"] = True
                    data["configs"].append(rec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--framework", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--models", default="resnet_small,resnet50")
    p.add_argument("--frameworks", default="hpcsgd,hpcsgd-nooverlap,hpcsgd-overlap,chainermn")
    p.add_argument("--communicator", default="hierarchical")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--cluster", action="store_true", help="also 4 ranks on the emulated 2-host cluster")
    p.add_argument("--cluster-models", default="resnet_small,resnet50")
    p.add_argument("--cluster-frameworks", default="hpcsgd,chainermn")
    p.add_argument("--cluster-wait", type=float, default=300,
                   help="seconds to wait for another job's emulated cluster to finish")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per job")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="round-robin rounds over all configurations")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--timeline", default=None,
                   help="path prefix: each configuration writes PREFIX_<model>_<framework>_<N>r.json "
                        "(Chrome trace of --timeline-iters)")
    p.add_argument("--timeline-iters", default="3:6")
    p.add_argument("--out", default=str(RESULTS / "scaling"))
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    args = p.parse_args(argv)
    if args.replot:  # recompute efficiencies and the model check, rewrite JSON and PNG
        finish(json.loads(Path(args.out).with_suffix(".json").read_text()), args)
        return 0
    if args.worker:
        from benchmarks._scaling_worker import worker

        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
