"""ResNet-50 training compute speed on CPU: stock Chainer vs hpcsgd kernels vs PyTorch, 1 and 2 threads.

    python benchmarks/compute.py --torch-python $TORCH_VENV/bin/python

Measures images/s of one forward+backward step (softmax cross-entropy, random
data, BN in training mode) of ResNet-50 v1.5 at 8 x 224 px and 32 x 64 px for

* ``chainer``: hpcsgd's ResNet-50 with kernels disabled (Chainer functions via ops),
* ``hpcsgd``: the same model with ``hpcsgd.kernels.enable()``,
* ``pytorch``: PyTorch CPU (oneDNN), when ``--torch-python`` names an interpreter
  that has torch (an optional extra, never an hpcsgd dependency),

at each thread count, in one run. Every measurement is a fresh subprocess
with ``OPENBLAS_CORETYPE`` (default: the CPU's vector class, SkylakeX on AVX-512
and Haswell on AVX2) set in its own environment (and,
for hpcsgd, ``OPENBLAS_THREAD_TIMEOUT=4`` as ``hpcsgd train`` sets it), so
the BLAS trap is avoided here regardless of the caller's environment; the
kernel that actually ran is recorded (threadpoolctl). Configurations are
interleaved over ``--rounds`` so load changes hit all alike; the result per
configuration is the median of all its timed steps. Peak: a 4096^3 sgemm in
the same run. FLOPs per trained image: 3 x 2 x 3.86 G x (res / 224)^2
(forward = 2 x MACs; backward = 2 x forward).

Writes ``benchmarks/results/compute.json`` and ``compute.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmarks._machine import machine  # noqa: E402  (imports no numpy either)
from hpcsgd.blas import cpu_coretype  # noqa: E402  (imports no numpy: the workers pick the kernel)

RESNET50_MACS_224 = 3.86e9
NOMINAL_PEAK_PER_CORE = 150e9  # FLOP/s, AVX-512 FMA at ~2.3 GHz sustained


def train_flops_per_image(res: int) -> float:
    """Forward+backward FLOPs of ResNet-50 for one image of ``res`` x ``res`` pixels."""
    return 3 * 2 * RESNET50_MACS_224 * (res / 224) ** 2


# ----------------------------------------------------------------------------- workers (subprocesses)

def _blas_info() -> list:
    from threadpoolctl import threadpool_info

    return [{k: i.get(k) for k in ("internal_api", "architecture", "version", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]


def worker_peak(threads: int) -> dict:
    import numpy as np

    from hpcsgd.kernels import set_threads

    set_threads(threads)
    n = 4096
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return {"impl": "peak", "threads": threads, "gflops_best": 2 * n**3 / min(times) / 1e9,
            "gflops_median": 2 * n**3 / statistics.median(times) / 1e9, "blas": _blas_info()}


def _build_resnet50():
    try:
        from hpcsgd.models import build_model

        return build_model("resnet50", 1000)
    except ImportError:  # models package not importable: fall back to the class itself
        from hpcsgd.models.resnet import ResNet

        return ResNet(50, 1000)


def worker_model(impl: str, batch: int, res: int, threads: int, iters: int, warmup: int) -> dict:
    import chainer
    import chainer.functions as F
    import numpy as np

    import hpcsgd.kernels as kernels

    kernels.set_threads(threads)
    kernels.enable(impl == "hpcsgd")
    model = _build_resnet50()
    rng = np.random.default_rng(0)
    x = rng.random((batch, 3, res, res), dtype=np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int32)

    def step():
        model.cleargrads()
        loss = F.softmax_cross_entropy(model(x), t)
        loss.backward()

    with chainer.using_config("train", True):
        for _ in range(warmup):
            step()
        times, cpu = [], []
        for _ in range(iters):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"impl": impl, "batch": batch, "res": res, "threads": threads, "step_seconds": times,
            "step_cpu_seconds": cpu,
            "blas": _blas_info(), "threads_in_force": kernels.current_threads(), "loadavg": os.getloadavg()}


# ----------------------------------------------------------------------------- driver

def _run(cmd: list, env: dict, timeout: float) -> dict | None:
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s: {' '.join(cmd)}", file=sys.stderr)
        return None
    if out.returncode != 0:
        print(f"  failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(threads: int, coretype: str, impl: str = "") -> dict:
    env = dict(os.environ)
    if coretype:  # none: a CPU below AVX2, where OpenBLAS's own choice stands
        env["OPENBLAS_CORETYPE"] = coretype
    if impl == "hpcsgd":  # what hpcsgd.blas.select_coretype sets in `hpcsgd train`
        from hpcsgd.blas import THREAD_TIMEOUT, THREAD_TIMEOUT_ENV

        env.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def drive(args) -> dict:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    impls = [i for i in args.impls if i != "pytorch" or args.torch_python]
    runs: dict = {}
    peaks: dict = {}
    me = [sys.executable, os.path.abspath(__file__)]
    started = time.time()
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        for threads in args.threads:
            cmd = me + ["--worker", "peak", "--threads", str(threads)]
            res = _run(cmd, _env(threads, args.coretype), 300)
            if res:
                peaks.setdefault(threads, []).append(res)
            for batch, px in shapes:
                for impl in impls:
                    key = f"{impl}/{batch}x{px}/t{threads}"
                    if impl == "pytorch":
                        cmd = [args.torch_python, os.path.join(HERE, "_torch_resnet50.py")]
                    else:
                        cmd = me + ["--worker", impl]
                    cmd += ["--batch", str(batch), "--res", str(px), "--threads", str(threads),
                            "--iters", str(args.iters), "--warmup", "1"]
                    t0 = time.time()
                    res = _run(cmd, _env(threads, args.coretype, impl), args.timeout)
                    if res:
                        runs.setdefault(key, []).append(res)
                        print(f"round {rnd} {key}: {[round(s, 2) for s in res['step_seconds']]} s/step "
                              f"(load {os.getloadavg()[0]:.1f}, {time.time() - t0:.0f} s)", flush=True)
    return summarise(args, runs, peaks, load_before, started)


def summarise(args, runs, peaks, load_before, started) -> dict:
    peak1 = max((p["gflops_best"] for p in peaks.get(1, [])), default=None)
    results = []
    for key, rs in runs.items():
        impl, shape, t = key.split("/")
        batch, res = (int(v) for v in shape.split("x"))
        threads = int(t[1:])
        steps = [s for r in rs for s in r["step_seconds"]]
        cpu = [s for r in rs for s in r.get("step_cpu_seconds", [])]
        ips = batch / statistics.median(steps)
        flops = ips * train_flops_per_image(res)
        results.append({
            "impl": impl, "batch": batch, "res": res, "threads": threads,
            "images_per_s": ips, "images_per_s_best": batch / min(steps), "steps_timed": len(steps),
            # CPU time of the process (all its threads): robust to other load, the fair
            # 1-thread comparison on a shared machine
            "images_per_cpu_s": batch / statistics.median(cpu) if cpu else None,
            "gflops": flops / 1e9,
            "fraction_of_nominal_peak": flops / (threads * NOMINAL_PEAK_PER_CORE),
            "fraction_of_measured_peak": flops / (threads * peak1 * 1e9) if peak1 else None,
            "blas": rs[0].get("blas"), "loadavg_during": [r["loadavg"] for r in rs],
            "extra": {k: rs[0][k] for k in ("torch", "mkldnn", "torch_threads", "threads_in_force")
                      if k in rs[0]},
        })
    by = {(r["impl"], r["batch"], r["res"], r["threads"]): r["images_per_s"] for r in results}
    cpu_by = {(r["impl"], r["batch"], r["res"], r["threads"]): r["images_per_cpu_s"] for r in results
              if r["images_per_cpu_s"]}
    ratios = {}
    for (impl, b, px, t), ips in by.items():
        name = f"{b}x{px}/t{t}"
        if impl == "hpcsgd":
            for other in ("pytorch", "chainer"):
                if (other, b, px, t) in by:
                    ratios[f"hpcsgd_over_{other}/{name}"] = ips / by[(other, b, px, t)]
            key = ("pytorch", b, px, t)
            if key in cpu_by and (impl, b, px, t) in cpu_by:
                ratios[f"hpcsgd_over_pytorch_per_cpu_s/{name}"] = cpu_by[(impl, b, px, t)] / cpu_by[key]
        if t != 1 and (impl, b, px, 1) in by:
            ratios[f"{impl}_t{t}_over_t1/{b}x{px}"] = ips / by[(impl, b, px, 1)]
    return {
        "benchmark": "compute", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "openblas_coretype_env": args.coretype, "rounds": args.rounds, "iters_per_round": args.iters,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": time.time() - started, "cpus": os.cpu_count(), "machine": machine(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "flops_per_train_image": {str(px): train_flops_per_image(px) for _, px in
                                  [tuple(int(v) for v in s.split("x")) for s in args.shapes]},
        "peak_sgemm": {str(t): ps for t, ps in peaks.items()},
        "peak_sgemm_1thread_gflops": peak1, "nominal_peak_per_core_gflops": NOMINAL_PEAK_PER_CORE / 1e9,
        "results": sorted(results, key=lambda r: (r["res"], r["threads"], r["impl"])), "ratios": ratios,
    }


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = summary["results"]
    groups = sorted({(r["batch"], r["res"]) for r in rs}, key=lambda g: -g[1])
    impls = [i for i in ("chainer", "hpcsgd", "pytorch") if any(r["impl"] == i for r in rs)]
    threads = sorted({r["threads"] for r in rs})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (b, px) in zip(axes[0], groups):
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            ys = [next((r["images_per_s"] for r in rs if (r["impl"], r["batch"], r["res"], r["threads"])
                        == (impl, b, px, t)), 0) for t in threads]
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(threads))]
            bars = ax.bar(xs, ys, width, label=impl)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(threads)), [f"{t} thread{'s' if t > 1 else ''}" for t in threads])
        ax.set_title(f"ResNet-50 fwd+bwd, {b} x {px} px")
        ax.set_ylabel("images/s")
        ax.legend(fontsize=8)
    load = summary["loadavg_before"][0], summary["loadavg_after"][0]
    fig.suptitle(f"OPENBLAS_CORETYPE={summary['openblas_coretype_env']}; "
                 f"load avg {load[0]:.1f} -> {load[1]:.1f} on {summary['cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", help="interpreter with torch installed (optional comparison)")
    p.add_argument("--shapes", nargs="+", default=["8x224", "32x64"], help="BATCHxRES")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--impls", nargs="+", default=["chainer", "hpcsgd", "pytorch"],
                   choices=["chainer", "hpcsgd", "pytorch"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=2, help="timed steps per round and configuration")
    p.add_argument("--coretype", default=cpu_coretype() or "",
                   help="OPENBLAS_CORETYPE for the measured processes (default: this CPU's vector class, "
                        "SkylakeX on AVX-512, Haswell on AVX2)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement subprocess")
    p.add_argument("--out", default=os.path.join(HERE, "results", "compute"))
    p.add_argument("--worker", choices=["peak", "chainer", "hpcsgd"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--res", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "peak":
        print(json.dumps(worker_peak(args.threads[0])))
        return 0
    if args.worker:
        print(json.dumps(worker_model(args.worker, args.batch, args.res, args.threads[0], args.iters,
                                      args.warmup)))
        return 0
    summary = drive(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, args.out + ".png")
    for r in summary["results"]:
        frac = r["fraction_of_measured_peak"] or float("nan")
        print(f"{r['impl']:8s} {r['batch']:3d}x{r['res']:<3d} t{r['threads']}: "
              f"{r['images_per_s']:7.2f} img/s "
              f"{r['gflops']:6.1f} GFLOP/s ({100 * frac:.0f}% of measured peak); "
              f"{r['images_per_cpu_s'] or float('nan'):.2f} img per CPU-s")
    for k, v in summary["ratios"].items():
        print(f"{k}: {v:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
