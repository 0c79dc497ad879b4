"""Whole training jobs, hpcsgd vs PyTorch DDP (gloo): training images/s and their ratio.

    python benchmarks/e2e.py --torch-python $TORCH_VENV/bin/python            # the full run
    python benchmarks/e2e.py --torch-python $TORCH_VENV/bin/python --smoke    # minutes, tiny sizes

Each workload trains the same architecture, batch, ranks, threads, optimizer
(momentum SGD) and data with

* ``hpcsgd``: ``mpiexec -n R python -m hpcsgd train`` under the caller's
  environment, BLAS setting included (``OPENBLAS_CORETYPE`` as it is);
* ``hpcsgd_auto``: the same command with ``OPENBLAS_CORETYPE`` (and hpcsgd's
  marker of its own choice) removed from that command's environment alone, so
  OpenBLAS picks its kernel by itself; skipped when they are unset anyway;
* ``pytorch``: ``benchmarks/_torch_e2e.py`` under ``--torch-python`` (DDP,
  gloo, oneDNN and torch's BLAS; torch is never an hpcsgd dependency).

Workloads (``--workloads``): ``resnet8`` (the main job's CIFAR-style ResNet-8,
width 8, on Fashion-MNIST, 128 images per rank), ``resnet50_64`` and
``resnet50_224`` (synthetic data, 32 and 8 images per rank), ``resnet50_jpeg``
(an ImageNet-style JPEG folder made from Fashion-MNIST images upscaled to RGB,
random-resized crops to 224, the loader in the loop: hpcsgd's, and torch's own
DataLoader with the same number of worker processes).

Every launch runs one untimed interval (warm-up: numba's cache, BLAS buffers,
the loader's first batches), then ``--intervals`` intervals of ``--interval``
steps; its result is the median images/s over its intervals
(hpcsgd's per-interval records of ``log.rank0.jsonl``). Launches are interleaved
over ``--repeats`` rounds and the reported number is the median over rounds.
Also recorded: the OpenBLAS kernel each hpcsgd launch ran (threadpoolctl, from
summary.json), torch's BLAS/oneDNN configuration, data wait as a fraction of
the step, a 2048^2 sgemm peak per rank under each BLAS setting and the
fraction of it each side reached (FLOPs counted from the model's convolutions
and linear layers, training = 3 x forward). Writes ``benchmarks/results/e2e.json``
and ``e2e.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmarks._machine import machine  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
MOMENTUM_SGD = {"recipe": "custom",
                "optimizer": {"name": "momentum_sgd", "momentum": 0.9, "weight_decay": 1e-4},
                "schedule": {"type": "constant", "lr": 0.1}}

# name -> (hpcsgd config keys, torch script arguments, steps per interval)

def _synthetic(px: int, batch: int) -> tuple:
    keys = {"model": "resnet50", "dataset": "synthetic", "batch_per_rank": batch, "loader_workers": 1,
            "dataset_options": {"shape": [3, px, px], "n_classes": 1000, "n": 100000}, **MOMENTUM_SGD}
    targs = ["--model", "resnet50", "--data", "synthetic", "--shape", "3", str(px), str(px),
             "--batch", str(batch)]
    return keys, targs


WORKLOADS = {
    "resnet8": ({"model": "resnet_small", "model_options": {"depth": 8, "width": 8},
                 "dataset": "fashion_mnist", "augment": False, "batch_per_rank": 128, "loader_workers": 1,
                 "recipe": "goyal", "recipe_options": {"lr": 0.4, "decay": "cosine"}},
                ["--model", "resnet_small", "--depth", "8", "--width", "8", "--data", "fmnist",
                 "--batch", "128"], 20),
    "resnet50_64": (*_synthetic(64, 32), 5),
    "resnet50_224": (*_synthetic(224, 8), 4),
    "resnet50_jpeg": ({"model": "resnet50", "dataset": "imagenet_folder", "batch_per_rank": 8,
                       "loader_workers": 2, "augment": True, **MOMENTUM_SGD},
                      ["--model", "resnet50", "--data", "folder", "--batch", "8", "--workers", "2"], 4),
}


# ----------------------------------------------------------------------------- data and one-off measurements

def make_jpeg_folder(root: str, n: int, fmnist: str = FMNIST, px: int = 256) -> str:
    """``root/{train,val}/c<label>/<i>.JPEG``: Fashion-MNIST images upscaled to ``px`` RGB, q90 (once)."""
    import numpy as np
    from PIL import Image

    from hpcsgd.data import build_dataset

    done = os.path.join(root, f".done-{n}-{px}")
    if os.path.exists(done):
        return root
    ds = build_dataset("fashion_mnist", fmnist, split="train")
    for split, count in (("train", n), ("val", max(10, n // 10))):
        for i in range(count):
            img, label = np.asarray(ds.source(i)), int(ds.labels[i])
            d = os.path.join(root, split, f"c{label}")
            os.makedirs(d, exist_ok=True)
            im = Image.fromarray(img.reshape(img.shape[0], img.shape[1])).resize((px, px), Image.BICUBIC)
            im.convert("RGB").save(os.path.join(d, f"{i:05d}.JPEG"), quality=90)
    open(done, "w").close()
    return root


def worker_meta(model: str, batch: int, shape: list, threads: int) -> dict:
    """The rank's sgemm peak (2048^2 at ``threads``) and the model's training FLOPs per image."""
    import chainer
    import chainer.functions as F
    import numpy as np

    import hpcsgd.kernels as kernels
    from hpcsgd.kernels.conv import Conv2D
    from hpcsgd.models import build_model

    kernels.set_threads(threads)
    kernels.enable(True)
    n = 2048
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    macs = [0]

    class Count(chainer.FunctionHook):
        def forward_postprocess(self, function, in_data):
            if isinstance(function, Conv2D):
                cout, cin, kh, kw = in_data[1].shape
                ho, wo = function.out_hw
                macs[0] += in_data[0].shape[0] * cout * cin * kh * kw * ho * wo
            elif type(function).__name__ == "LinearFunction":
                macs[0] += in_data[0].shape[0] * in_data[1].shape[0] * in_data[1].shape[1]

    kw = {"depth": 8, "width": 8} if model == "resnet_small" else {}
    m = build_model(model, 10, in_channels=shape[0], **kw)
    x = np.zeros((2, *shape), np.float32)
    with Count(), chainer.using_config("train", True):
        F.sum(m(x))
    from threadpoolctl import threadpool_info

    return {"sgemm_gflops": 2 * n**3 / statistics.median(times) / 1e9,
            "train_flops_per_image": 3 * 2 * macs[0] / 2,
            "blas": [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                     for i in threadpool_info() if i.get("user_api") == "blas"]}


# ----------------------------------------------------------------------------- launches

def _run(cmd, env, timeout, cwd=ROOT):
    try:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s: {' '.join(cmd)}", file=sys.stderr)
        return None
    if out.returncode != 0:
        print(f"  failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return out.stdout


def env_for(side: str, threads: int) -> dict:
    env = dict(os.environ)
    if side == "hpcsgd_auto":  # this command alone: OpenBLAS picks its own kernel
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("HPCSGD_OPENBLAS_CORETYPE_BY", None)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_hpcsgd(side, wl, args, data_path, tmp) -> dict | None:
    keys, _, interval = WORKLOADS[wl]
    interval, intervals = _steps(args, interval)
    cfg = dict(keys, threads=args.threads, progress=False, eval_interval=0, checkpoint_interval=0,
               log_interval=interval, stop_iteration=interval * (1 + intervals), epochs=1000, seed=0)
    if data_path:
        cfg["data_path"] = data_path
    if args.smoke:
        cfg["batch_per_rank"] = max(2, cfg["batch_per_rank"] // 8)
    out = tempfile.mkdtemp(prefix=f"{wl}-{side}-", dir=tmp)
    cfg_path = os.path.join(out, "config.yaml")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    cmd = [args.mpiexec, "-n", str(args.ranks), sys.executable, "-m", "hpcsgd", "train", cfg_path,
           "--out", os.path.join(out, "run")]
    try:
        if _run(cmd, env_for(side, args.threads), args.timeout) is None:
            return None
        return _read_run(os.path.join(out, "run"), interval, cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # checkpoints: ~0.3 GB per ResNet-50 launch


def _read_run(run: str, interval: int, cfg: dict) -> dict:
    """Images/s per timed interval (rank 0's log), data wait fraction, the BLAS kernel (summary)."""
    recs, summary = [], {}
    with open(os.path.join(run, "log.rank0.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                recs.append(r)
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    timed = [r for r in recs if r["iteration"] > interval]  # the first record is the warm-up
    ips = [r["images_per_s"] for r in timed]
    wait = [r["phase_mean_s"].get("data_wait", 0.0) / r["seconds_per_iter"] for r in timed]
    return {"images_per_s": statistics.median(ips), "intervals": ips,
            "data_wait_fraction": statistics.median(wait),
            "blas": summary.get("versions", {}).get("blas"), "loadavg": os.getloadavg(),
            "batch_per_rank": cfg["batch_per_rank"]}


def _steps(args, interval):
    """(steps per interval, timed intervals); one more interval runs first, untimed."""
    return (2 if args.smoke else args.interval or interval), args.intervals


def run_torch(wl, args, data_path) -> dict | None:
    _, targs, interval = WORKLOADS[wl]
    interval, intervals = _steps(args, interval)
    targs = list(targs)
    if args.smoke:
        i = targs.index("--batch")
        targs[i + 1] = str(max(2, int(targs[i + 1]) // 8))
    cmd = [args.torch_python, os.path.join(HERE, "_torch_e2e.py"), *targs, "--ranks", str(args.ranks),
           "--threads", str(args.threads), "--warmup", str(interval), "--interval", str(interval),
           "--intervals", str(intervals)]
    if data_path:
        cmd += ["--data-path", data_path]
    out = _run(cmd, env_for("pytorch", args.threads), args.timeout)
    if out is None:
        return None
    r = json.loads(out.strip().splitlines()[-1])
    r["intervals"] = r.pop("images_per_s")
    r["images_per_s"] = statistics.median(r["intervals"])
    r["data_wait_fraction"] = statistics.median(
        w / s for w, s in zip(r["data_wait_s_per_step"], r["seconds_per_step"]))
    return r


def sides(args) -> list:
    out = ["hpcsgd"]
    if os.environ.get("OPENBLAS_CORETYPE") and not args.no_auto:
        out.append("hpcsgd_auto")
    if args.torch_python:
        out.append("pytorch")
    return out


def drive(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="hpcsgd-e2e-")
    data = {wl: None for wl in args.workloads}
    if "resnet8" in data:
        data["resnet8"] = args.fmnist
    if "resnet50_jpeg" in data:
        data["resnet50_jpeg"] = make_jpeg_folder(args.jpeg_root or os.path.join(tmp, "jpeg"),
                                                 64 if args.smoke else args.jpeg_images, args.fmnist)
    meta = {}
    me = [sys.executable, os.path.abspath(__file__), "--worker-meta"]
    for side in [s for s in sides(args) if s != "pytorch"]:
        for wl in args.workloads:
            keys = WORKLOADS[wl][0]
            shape = keys.get("dataset_options", {}).get("shape")
            shape = shape or ([1, 28, 28] if wl == "resnet8" else [3, 224, 224])
            cmd = me + [keys["model"], json.dumps(shape), str(args.threads)]
            out = _run(cmd, env_for(side, args.threads), 600)
            if out:
                meta.setdefault(side, {})[wl] = json.loads(out.strip().splitlines()[-1])
    runs: dict = {}
    for rnd in range(args.repeats):
        for wl in args.workloads:
            for side in sides(args):
                t0 = time.time()
                if side == "pytorch":
                    r = run_torch(wl, args, data[wl])
                else:
                    r = run_hpcsgd(side, wl, args, data[wl], tmp)
                if r:
                    runs.setdefault(wl, {}).setdefault(side, []).append(r)
                    print(f"round {rnd} {wl} {side}: {r['images_per_s']:.1f} images/s, data wait "
                          f"{100 * r['data_wait_fraction']:.1f}% (load {os.getloadavg()[0]:.1f}, "
                          f"{time.time() - t0:.0f} s)", flush=True)
    if not args.jpeg_root:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(args, runs, meta)


def summarise(args, runs, meta) -> dict:
    results = {}
    for wl, by_side in runs.items():
        row = {}
        for side, rs in by_side.items():
            ips = statistics.median(r["images_per_s"] for r in rs)
            m = meta.get("hpcsgd", {}).get(wl, {})
            # the machine's sgemm peak per rank: the faster of the BLAS settings measured
            peak = max((v[wl]["sgemm_gflops"] for v in meta.values() if wl in v), default=None)
            flops = m.get("train_flops_per_image")
            row[side] = {
                "images_per_s": ips, "per_launch": [r["images_per_s"] for r in rs],
                "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in rs),
                "blas": rs[0].get("blas"), "gflops": ips * flops / 1e9 if flops else None,
                "fraction_of_sgemm_peak": ips * flops / (args.ranks * peak * 1e9) if flops and peak else None,
                "machine_sgemm_peak_gflops_per_rank": peak,
                "extra": {k: rs[0][k] for k in ("torch", "mkldnn", "cpu_capability", "threads")
                          if k in rs[0]},
            }
        base = row.get("pytorch", {}).get("images_per_s")
        for side in row:
            if side != "pytorch" and base:
                row[side]["ratio_vs_pytorch"] = row[side]["images_per_s"] / base
        results[wl] = row
    return {"results": results, "meta": meta,
            "args": {k: v for k, v in vars(args).items() if k != "worker_meta"},
            "environment": {"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
                            "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg()},
            "machine": machine(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    wls = list(res)
    all_sides = [s for s in ("hpcsgd", "hpcsgd_auto", "pytorch") if any(s in res[w] for w in wls)]
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(wls), 4))
    width = 0.8 / max(len(all_sides), 1)
    for k, side in enumerate(all_sides):
        xs = [i + k * width for i, w in enumerate(wls) if side in res[w]]
        ys = [res[w][side]["images_per_s"] / res[w].get("pytorch", res[w][side])["images_per_s"]
              for w in wls if side in res[w]]
        bars = ax.bar(xs, ys, width, label=side)
        for b, w in zip(bars, [w for w in wls if side in res[w]]):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{res[w][side]['images_per_s']:.3g}",
                    ha="center", va="bottom", fontsize=7)
    ax.axhline(1.1, ls="--", lw=0.8, color="grey")
    ax.set_xticks([i + width * (len(all_sides) - 1) / 2 for i in range(len(wls))], wls)
    ax.set_ylabel("training images/s relative to PyTorch DDP\n(bar labels: images/s)")
    ax.set_title(f"{report['args']['ranks']} ranks x {report['args']['threads']} thread(s), "
                 f"median of {report['args']['repeats']} launches")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", default=None, help="interpreter with torch (omit: hpcsgd only)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per rank, both sides")
    p.add_argument("--repeats", type=int, default=3, help="interleaved launches per side and workload")
    p.add_argument("--intervals", type=int, default=3, help="timed intervals per launch")
    p.add_argument("--interval", type=int, default=None, help="steps per interval (default: per workload)")
    p.add_argument("--no-auto", action="store_true", help="skip the launch with OPENBLAS_CORETYPE unset")
    p.add_argument("--smoke", action="store_true", help="tiny batches, 2-step intervals: checks it runs")
    p.add_argument("--fmnist", default=FMNIST, help="Fashion-MNIST IDX folder")
    p.add_argument("--jpeg-root", default=None, help="where to make the JPEG folder once (default: temp)")
    p.add_argument("--jpeg-images", type=int, default=2000)
    p.add_argument("--mpiexec", default="mpiexec")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    p.add_argument("--out", default=os.path.join(HERE, "results", "e2e.json"))
    p.add_argument("--worker-meta", nargs=3, metavar=("MODEL", "SHAPE", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_meta:
        model, shape, threads = args.worker_meta
        print(json.dumps(worker_meta(model, 0, json.loads(shape), int(threads))))
        return 0
    report = drive(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if report["results"]:
        plot(report, os.path.splitext(args.out)[0] + ".png")
    for wl, row in report["results"].items():
        line = ", ".join(f"{s} {v['images_per_s']:.1f}" + (f" ({v['ratio_vs_pytorch']:.2f}x)"
                                                          if "ratio_vs_pytorch" in v else "")
                         for s, v in row.items())
        print(f"{wl}: {line} images/s")
    print(f"wrote {args.out}")
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
