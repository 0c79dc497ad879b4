"""Allreduce overlapped with backward vs. not, in the same run.

    OPENBLAS_CORETYPE=SkylakeX python benchmarks/overlap.py            # 2 ranks, ResNet-50 @ 32x32
    python benchmarks/overlap.py --model resnet_small --hw 32 --batch 32

The driver launches ``mpiexec -n RANKS`` once. It runs, interleaved round-robin so
that load changes hit all of them alike, steps of (every reduction is the one
gradient-reduction engine, ``hpcsgd.comm.reducer.GradReducer``, driven three ways):

* ``compute``: forward + backward only (no communication): the compute time;
* ``sync_<name>``: backward, then the communicator's own ``multi_node_mean_grad``
  (ChainerMN-style, after backward);
* ``double_buffer_<name>``: ChainerMN's double buffering: step t waits for step t-1's
  mean and starts its own with ``multi_node_mean_grad_async`` (one step stale);
* ``no_overlap_comm``: the overlapped driver with overlap off (backward order, all buckets
  after backward: the in-run baseline of the next);
* ``comm_<MB>``: overlapped, the communicator's bucket algorithm on the engine's thread.

(``--engines`` and ``--no-async`` are accepted for command-line compatibility with older
versions that also measured the removed 'poll'/'thread'/'none' modes; only 'comm' remains.)

Step time is the slowest rank's time from a barrier to the averaged grads (median of
repeats). Exposed communication = median step time - median compute time of the
same launch. Writes ``benchmarks/results/overlap.json`` and ``overlap.png`` (``--out``); the top-level
``overlap_fraction`` (read by ``hpcsgd predict --overlap measured``) is that of the shipped
defaults against the same engine without overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
from benchmarks._machine import machine  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--hw", type=int, default=32, help="input height/width in pixels")
    p.add_argument("--batch", type=int, default=4, help="images per rank")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bucket-mb", default="0.25,1,4,16,64", help="bucket sizes (MiB of float32) to sweep")
    p.add_argument("--async-bucket-mb", default="4",
                   help="bucket sizes for the (slow) launch with MPICH's async progress thread")
    p.add_argument("--communicator", default="hierarchical",
                   help="the communicator (its sync_<name> and double_buffer_<name> baselines)")
    p.add_argument("--engines", default="comm", help="overlap engines (only 'comm' exists now)")
    p.add_argument("--no-async", action="store_true", help="accepted for compatibility (no async launch)")
    p.add_argument("--replot", action="store_true", help="only redraw OUT.png from OUT.json")
    p.add_argument("--out", default=str(RESULTS / "overlap"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON path: run as an MPI rank
    p.add_argument("--tag", default="plain", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- rank side ---------------------------------------------------------------------------------

def _worker(a) -> None:
    """Rank side: every configuration, round-robin, ``--warmup + --repeats`` times; rank 0 writes JSON."""
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from hpcsgd.comm import create_communicator
    from hpcsgd.models import build_model

    threadpool_limits(1)  # one thread per rank: the machine has 2 cores
    world = MPI.COMM_WORLD
    algo = create_communicator(a.communicator)  # an unknown name raises: no silent fallback
    model = build_model(a.model, 1000 if a.model.startswith("resnet") and a.model != "resnet_small" else 10,
                        bn_mode="batch")
    configs, reducers, pending = _configs(a, algo, model)
    times = {k: [] for k in configs}
    stats = {k: [] for k in reducers}
    for rep in range(a.warmup + a.repeats):
        for name, step in configs.items():
            world.Barrier()
            t0 = time.perf_counter()
            step()
            dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if rep >= a.warmup:
                times[name].append(dt)
                if name in reducers:
                    stats[name].append(reducers[name].stats)
    if pending:
        pending.pop().wait()
    for r in reducers.values():
        r.finalize()
    if world.rank == 0:
        n_floats = sum(p.size for p in model.params())
        Path(a.worker).write_text(json.dumps(_record(a, world.size, n_floats, times, stats), indent=1))


def _configs(a, algo, model) -> tuple[dict, dict, list]:
    """``(name -> step function, name -> OverlappedReducer, pending async means)`` on one fixed batch."""
    import copy

    import chainer.functions as F
    import numpy as np

    from hpcsgd.comm import check_combination
    from hpcsgd.comm.overlap import OverlappedReducer
    from hpcsgd.errors import ConfigError

    rng = np.random.default_rng(algo.rank)
    x = rng.standard_normal((a.batch, 3, a.hw, a.hw)).astype(np.float32)
    t = rng.integers(0, 10, a.batch).astype(np.int32)
    model(x)
    algo.bcast_data(model)

    def fwd_bwd(reducer=None):
        model.cleargrads()
        loss = F.softmax_cross_entropy(model(x), t)
        if reducer is None:
            loss.backward()
        else:
            with reducer:
                loss.backward()

    shadow, pending = copy.deepcopy(model), []

    def double_buffered():
        """ChainerMN double buffering: wait for step t-1's mean, start step t's in the background."""
        fwd_bwd()
        if pending:
            pending.pop().wait()  # the optimizer would apply these (one step stale) now
        for (_, p), (_, q) in zip(sorted(model.namedparams()), sorted(shadow.namedparams())):
            p.grad, q.grad = q.grad, p.grad
        pending.append(algo.multi_node_mean_grad_async(shadow, True))

    configs = {"compute": lambda: fwd_bwd(),
               f"sync_{a.communicator}": lambda: (fwd_bwd(), algo.multi_node_mean_grad(model, True)),
               f"double_buffer_{a.communicator}": double_buffered}
    reducers = {}
    unknown = set(a.engines.split(",")) - {"comm", "poll", "thread", "none"}
    if unknown:
        raise SystemExit(f"unknown --engines {sorted(unknown)}")
    try:
        check_combination(algo, overlap=True)
    except ConfigError as e:  # a communicator without a bucket algorithm
        print(f"rank {algo.rank}: no overlap configs: {e}", file=sys.stderr)
        return configs, reducers, pending
    # the same algorithm and copies as comm_<MB>, all buckets after backward
    nocomm = OverlappedReducer(algo, model, bucket_bytes=4 << 20, overlap=False)
    reducers["no_overlap_comm"] = nocomm
    configs["no_overlap_comm"] = lambda: (fwd_bwd(nocomm), nocomm.wait())
    for mb in [float(v) for v in a.bucket_mb.split(",")]:
        name = f"comm_{mb:g}MB"
        r = OverlappedReducer(algo, model, bucket_bytes=int(mb * (1 << 20)))
        reducers[name] = r
        configs[name] = (lambda r=r: (fwd_bwd(r), r.wait()))
    return configs, reducers, pending


def _record(a, ranks: int, n_floats: int, times: dict, stats: dict) -> dict:
    """Rank 0's record: per configuration the median step (s) and its exposed communication."""
    from threadpoolctl import threadpool_info

    compute = statistics.median(times["compute"])
    out = {"tag": a.tag, "ranks": ranks, "model": a.model, "hw": a.hw, "batch": a.batch,
           "grad_floats": int(n_floats), "grad_bytes": int(4 * n_floats),
           "async_progress_env": os.environ.get("MPIR_CVAR_ASYNC_PROGRESS"),
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
           "blas": [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                    for i in threadpool_info()],
           "configs": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        entry = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "samples_s": ts,
                 "exposed_comm_s": med - compute}
        if stats.get(name):
            entry["early_buckets_median"] = statistics.median(s["overlapped_buckets"] for s in stats[name])
            entry["buckets"] = stats[name][-1]["buckets"]
            entry["wait_after_backward_s"] = statistics.median(s["wait_s"] for s in stats[name])
        out["configs"][name] = entry
    return out


# -- driver ------------------------------------------------------------------------------------

def _launch(a, tag: str, env_extra: dict) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(a.ranks), sys.executable, "-m",
               "mpi4py", __file__, "--worker", str(path), "--tag", tag, "--model", a.model, "--hw", str(a.hw),
               "--batch", str(a.batch), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
               "--bucket-mb", a.bucket_mb, "--communicator", a.communicator, "--engines", a.engines]
        env = dict(os.environ, **env_extra)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        load0 = os.getloadavg()
        subprocess.run(cmd, env=env, check=True, timeout=3600)
        res = json.loads(path.read_text())
        res["loadavg_before"], res["loadavg_after"] = load0, os.getloadavg()
        return res


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        names = [n for n in run["configs"] if n != "compute"]
        exposed = [1e3 * run["configs"][n]["exposed_comm_s"] for n in names]
        overlapped = ("poll", "thread", "none", "comm")
        colors = ["tab:blue" if n.split("_")[0] in overlapped else "tab:gray" for n in names]
        ax.barh(names, exposed, color=colors, label="step - compute")
        waits = [(n, 1e3 * run["configs"][n]["wait_after_backward_s"]) for n in names
                 if "wait_after_backward_s" in run["configs"][n]]
        if waits:
            ax.scatter([w for _, w in waits], [n for n, _ in waits], color="tab:red", marker="x", zorder=3,
                       label="reducer: wait after backward")
        ax.legend(loc="lower right", fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("exposed communication = step - compute (ms, median)")
        ax.set_title(f"{run['model']} {run['hw']}px b={run['batch']}, {run['ranks']} ranks, {run['tag']}\n"
                     f"compute {1e3 * run['configs']['compute']['median_s']:.0f} ms, "
                     f"grads {run['grad_bytes'] / 1e6:.0f} MB, load {run['loadavg_before'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _summary(runs: list[dict]) -> dict:
    """Top-level fields: the overlap fraction of the shipped defaults, against their own baseline.

    ``1 - exposed(default engine, default bucket) / exposed(same engine without overlap)`` in the
    plain launch; the 'comm' engine's baseline is ``no_overlap_comm``, the MPI engines' ``no_overlap``.
    """
    from hpcsgd.comm.overlap import DEFAULT_BUCKET_BYTES

    plain = runs[0]["configs"]
    engine = "comm" if any(k.startswith("comm_") and k.endswith("MB") for k in plain) else "poll"
    default = f"{engine}_{DEFAULT_BUCKET_BYTES / 2**20:g}MB"
    baseline = "no_overlap_comm" if engine == "comm" and "no_overlap_comm" in plain else "no_overlap"
    fraction = None
    base = plain[baseline]["exposed_comm_s"] if baseline in plain else 0.0
    if default in plain and base > 0:
        fraction = max(0.0, min(1.0, 1 - plain[default]["exposed_comm_s"] / base))
    return {"overlap_fraction": fraction, "overlap_fraction_config": default,
            "overlap_fraction_baseline": baseline, "runs": runs}


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        _worker(a)
        return 0
    if a.replot:  # recompute the summary and redraw from the stored runs
        stored = json.loads(Path(f"{a.out}.json").read_text())
        runs = stored["runs"]
        summary = _summary(runs)
        if "machine" in stored:  # the machine the runs were measured on, not the one redrawing them
            summary["machine"] = stored["machine"]
        Path(f"{a.out}.json").write_text(json.dumps(summary, indent=1))
        _plot(runs, Path(f"{a.out}.png"))
        return 0
    runs = [_launch(a, "plain", {})]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for run in runs:
        cfg = run["configs"]
        base = cfg.get("no_overlap_comm", cfg.get("no_overlap", cfg["compute"]))["median_s"]
        for entry in cfg.values():
            entry["speedup_vs_no_overlap"] = base / entry["median_s"]
    summary = {**_summary(runs), "machine": machine()}
    Path(f"{out}.json").write_text(json.dumps(summary, indent=1))
    _plot(runs, Path(f"{out}.png"))
    for run in runs:
        print(f"== {run['tag']} (load {run['loadavg_before'][0]:.1f} -> {run['loadavg_after'][0]:.1f})")
        for name, e in run["configs"].items():
            print(f"  {name:16s} step {1e3 * e['median_s']:8.1f} ms  "
                  f"exposed {1e3 * e['exposed_comm_s']:7.1f} ms  "
                  f"x{e['speedup_vs_no_overlap']:.3f} vs no_overlap")
    print(f"wrote {out}.json and {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
