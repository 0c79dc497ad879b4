"""Allreduce benchmark: OSU-style size sweep and the ResNet-50 gradient set (not a test).

Run (2 ranks on one node; never more ranks than cores for timing; ``--gpu``: one rank per GPU,
CuPy gradients and the NCCL communicators, see ``benchmarks/_gpu_allreduce.py``)::

    OPENBLAS_CORETYPE=SkylakeX .venv/bin/mpiexec -n 2 .venv/bin/python -m mpi4py \
        benchmarks/allreduce.py [--quick] [--repeats 15]

In one run, as medians over interleaved repeats (every case runs once per round,
so machine load hits all cases alike):

* an OSU-style sweep of ``MPI_Allreduce`` (float32 SUM) over message sizes;
* the ResNet-50 gradients (Chainer's ``ResNet50Layers``: 162 arrays, 25,557,096
  float32 = 102.2 MB; built from shapes, no weights) averaged by ChainerMN's
  ``naive`` communicator, by MPI's own Allreduce of a packed float32 buffer
  (whole and in 4 MiB buckets, without packing), and by hpcsgd's naive / flat /
  hierarchical communicators with float32 and float16 on the wire.

Several launches (the driver starts each one itself, no ``mpiexec`` around it)::

    OPENBLAS_CORETYPE=SkylakeX .venv/bin/python benchmarks/allreduce.py --launches 10 --repeats 25

runs ``--launches`` fresh ``mpiexec -bind-to core -n 2`` launches of ChainerMN naive
and the default communicator only (``--focus``) and reports per-launch medians and
ratios with their min/max (``benchmarks/_launches.py``; ``results/allreduce_launches.json``).

Reported per case: median ms (max over ranks of each repeat), algbw = gradient
bytes (float32) / time and busbw = algbw * 2(n-1)/n (nccl-tests definitions),
and the ratio to ChainerMN naive. Writes ``benchmarks/results/allreduce.json``
and ``.png``; records ``os.getloadavg()`` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._bandwidth import allreduce_bandwidth  # noqa: E402
from benchmarks._machine import machine  # noqa: E402


def resnet50_shapes() -> list[tuple[str, tuple]]:
    """(name, shape) of every parameter of ``chainer.links.ResNet50Layers``, sorted by name."""
    out = [("/conv1/W", (64, 3, 7, 7)), ("/conv1/b", (64,)), ("/bn1/gamma", (64,)), ("/bn1/beta", (64,)),
           ("/fc6/W", (1000, 2048)), ("/fc6/b", (1000,))]

    def bn(prefix, c):
        out.extend([(f"{prefix}/gamma", (c,)), (f"{prefix}/beta", (c,))])

    for stage, (n, cin, mid, cout) in enumerate([(3, 64, 64, 256), (4, 256, 128, 512),
                                                 (6, 512, 256, 1024), (3, 1024, 512, 2048)], start=2):
        p = f"/res{stage}/a"
        for conv, shape in (("conv1", (mid, cin, 1, 1)), ("conv2", (mid, mid, 3, 3)),
                            ("conv3", (cout, mid, 1, 1)), ("conv4", (cout, cin, 1, 1))):
            out.append((f"{p}/{conv}/W", shape))
            bn(f"{p}/bn{conv[-1]}", shape[0])
        for b in range(1, n):
            p = f"/res{stage}/b{b}"
            for conv, shape in (("conv1", (mid, cout, 1, 1)), ("conv2", (mid, mid, 3, 3)),
                                ("conv3", (cout, mid, 1, 1))):
                out.append((f"{p}/{conv}/W", shape))
                bn(f"{p}/bn{conv[-1]}", shape[0])
    return sorted(out)


def grad_model(shapes, seed: int):
    """A ``chainer.Link`` whose parameters have ``shapes`` (names kept, sorted order preserved)."""
    import chainer

    link = chainer.Link()
    rng = np.random.default_rng(seed)
    with link.init_scope():
        for i, (_, shape) in enumerate(shapes):
            p = chainer.Parameter(np.zeros(shape, np.float32))
            p.grad = rng.standard_normal(shape).astype(np.float32) * 1e-2
            setattr(link, f"p{i:03d}", p)
    return link


def timed(comm, fn, reset) -> float:
    reset()
    comm.Barrier()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return comm.allreduce(dt, op=__import__("mpi4py").MPI.MAX)


def osu_sweep(comm, sizes, repeats: int) -> list[dict]:
    from mpi4py import MPI

    n = comm.Get_size()
    rows = []
    for nbytes in sizes:
        buf = np.ones(max(1, nbytes // 4), np.float32)
        iters = max(3, min(200, int(2e7 // max(nbytes, 1))))
        meds = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            meds.append(comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))
        t = float(np.median(meds))
        rows.append({"bytes": int(buf.nbytes), "us": t * 1e6, **allreduce_bandwidth(buf.nbytes, t, n)})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few sizes, 3 repeats (< 20 s)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="JSON path (default results/allreduce.json, _gpu with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="CuPy gradients, NCCL communicators")
    ap.add_argument("--focus", action="store_true",
                    help="ResNet-50 only: ChainerMN naive and the default communicator (no sweeps)")
    ap.add_argument("--focus-buckets", type=int, nargs="*", default=[2, 16],
                    help="--focus: also time hierarchical at these bucket sizes (MiB)")
    ap.add_argument("--launches", type=int, default=0,
                    help="driver: run this many fresh mpiexec launches with --focus (run without mpiexec)")
    ap.add_argument("--ranks", type=int, default=2, help="ranks per launch (--launches)")
    ap.add_argument("--bind", default="core", help="hydra -bind-to of each launch, or 'none' (--launches)")
    ap.add_argument("--launch-timeout", type=float, default=300, help="seconds per launch (--launches)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.launches:
        from benchmarks._launches import run_launches

        args.out = args.out or str(ROOT / "benchmarks" / "results" / "allreduce_launches.json")
        return run_launches(args, Path(__file__).resolve())
    if args.gpu:
        from benchmarks._gpu_allreduce import run

        args.out = args.out or str(ROOT / "benchmarks" / "results" / "allreduce_gpu.json")
        return run(args, resnet50_shapes, grad_model)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "allreduce.json")

    import chainer  # noqa: F401
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    repeats = 3 if args.quick else args.repeats
    load_before = os.getloadavg()

    sizes = [4 << k for k in range(0, 25, 2)] if not args.quick else [4, 4096, 1 << 20, 8 << 20]
    osu = [] if args.focus else osu_sweep(comm, sizes, max(3, repeats // 3))

    shapes = resnet50_shapes()
    if args.quick:
        shapes = shapes[::4]
    model = grad_model(shapes, seed=rank)
    params = [p for _, p in sorted(model.namedparams())]
    originals = [p.grad.copy() for p in params]

    def reset():
        for p, g in zip(params, originals):
            np.copyto(p.grad, g)

    cases, sweep, default = build_cases(args, comm, model, originals)
    times, cpus = time_cases(comm, cases, reset, repeats)
    placement = {"cpus": sorted(c for c in cpus if c is not None), "anon_huge_mb": anon_huge_mb(),
                 # the default communicator's probe (one node): core-to-core round trip, ns
                 "round_trip_ns": getattr(default, "node_round_trip_ns", None)}
    placement = comm.gather(placement, 0)
    if rank != 0:
        return 0
    meta = {"arrays": len(shapes), "elements": int(sum(int(np.prod(s)) for _, s in shapes)),
            "grad_bytes": int(sum(g.nbytes for g in originals)), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "bucket_bytes": default.get_config("bucket_bytes"),
            "placement": placement, "ranks": comm.Get_size(), "repeats": repeats}
    return report(args, times, set(sweep), osu, meta)


def time_cases(comm, cases: dict, reset, repeats: int) -> tuple[dict, set]:
    """Seconds of each case per repeat (cases interleaved, after one warm-up each: JIT, windows, page
    faults), and the CPUs this rank ran on."""
    for fn in cases.values():
        timed(comm, fn, reset)
    times: dict[str, list] = {k: [] for k in cases}
    cpus = set()
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(timed(comm, fn, reset))
            cpus.add(current_cpu())
    return times, cpus


def current_cpu() -> int | None:
    """The CPU this process last ran on (``/proc/self/stat`` field 39), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def anon_huge_mb() -> float | None:
    """MB of this process's memory on transparent huge pages (``AnonHugePages`` in smaps_rollup)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def build_cases(args, comm, model, originals) -> tuple[dict, dict, object]:
    """Timed cases (name -> fn), the bucket-size sweep's subset, and the default communicator."""
    import chainermn
    from mpi4py import MPI

    import hpcsgd

    cases = {}
    cmn = chainermn.create_communicator("naive", mpi_comm=comm)
    cases["chainermn naive"] = lambda: cmn.multi_node_mean_grad(model)
    default = hpcsgd.create_communicator()
    if args.focus:
        cases["hpcsgd default (hierarchical)"] = lambda: default.multi_node_mean_grad(model)
        for mib in args.focus_buckets:
            c = hpcsgd.create_communicator("hierarchical", bucket_bytes=mib << 20)
            cases[f"hierarchical f32 bucket {mib} MiB"] = (lambda c=c: c.multi_node_mean_grad(model))
        return cases, {}, default
    packed = np.concatenate([g.reshape(-1) for g in originals])
    cases["MPI Allreduce packed f32 (no pack)"] = lambda: comm.Allreduce(MPI.IN_PLACE, packed, op=MPI.SUM)
    step = (4 << 20) // 4

    def mpi_buckets():
        for lo in range(0, packed.size, step):
            comm.Allreduce(MPI.IN_PLACE, packed[lo:lo + step], op=MPI.SUM)

    if not args.quick:
        cases["MPI Allreduce 4MiB buckets f32 (no pack)"] = mpi_buckets
    for name in ("naive", "flat", "hierarchical"):
        for dt in ("float32", "float16"):
            if args.quick and (name == "naive" or dt == "float16"):
                continue
            c = hpcsgd.create_communicator(name, allreduce_grad_dtype=dt)
            cases[f"hpcsgd {name} {dt}"] = (lambda c=c: c.multi_node_mean_grad(model))
    cases["hpcsgd default (hierarchical)"] = lambda: default.multi_node_mean_grad(model)
    dummy = hpcsgd.create_communicator("dummy")
    cases["hpcsgd dummy f32 (pack+unpack only)"] = lambda: dummy.multi_node_mean_grad(model)
    dummy16 = hpcsgd.create_communicator("dummy", allreduce_grad_dtype="float16")
    if not args.quick:
        cases["hpcsgd dummy f16 (pack+unpack only)"] = lambda: dummy16.multi_node_mean_grad(model)
    sweep = {}
    if not args.quick:  # bucket size: the same algorithm at several sizes, same rounds
        for name in ("flat", "hierarchical"):
            for mib in (1, 2, 4, 16, 64):
                c = hpcsgd.create_communicator(name, allreduce_grad_dtype="float32", bucket_bytes=mib << 20)
                sweep[f"{name} f32 bucket {mib} MiB"] = (lambda c=c: c.multi_node_mean_grad(model))
    cases.update(sweep)
    return cases, sweep, default


def report(args, times: dict, sweep: set, osu: list, meta: dict) -> int:
    """Rank 0: medians, ratios to ChainerMN naive, the JSON, the plot and the printed table."""
    from mpi4py import MPI

    from hpcsgd.comm import wire_convert

    n, nbytes = meta["ranks"], meta["grad_bytes"]
    base = float(np.median(times["chainermn naive"]))
    results = {}
    for k, ts in times.items():
        t = float(np.median(ts))
        results[k] = {"median_ms": t * 1e3, "min_ms": float(np.min(ts)) * 1e3,
                      **allreduce_bandwidth(nbytes, t, n),
                      "ratio_to_chainermn_naive": t / base, "repeats_ms": [x * 1e3 for x in ts]}
    bucket_sweep = {k: results.pop(k) for k in sweep}
    out = {
        **meta, "quick": args.quick, "focus": args.focus,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "cpus": os.cpu_count(), "machine": machine(),
        "mpi": MPI.Get_library_version().splitlines()[0],
        "numba_hardware_half": wire_convert.HARDWARE_HALF,
        "osu_allreduce_f32": osu, "resnet50": results, "bucket_sweep": bucket_sweep,
        "command": ("mpiexec -n 2 python -m mpi4py benchmarks/allreduce.py"
                    + (" --quick" if args.quick else "") + (" --focus" if args.focus else "")),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    if args.focus:  # one launch of --launches: the driver reads the JSON
        return 0
    plot(out, path.with_suffix(".png"))
    w = max(len(k) for k in results)
    la, lb = meta["loadavg_before"][0], meta["loadavg_after"][0]
    print(f"ResNet-50 gradients: {meta['arrays']} arrays, {nbytes / 1e6:.1f} MB, {n} ranks, "
          f"load {la:.2f}->{lb:.2f}")
    for k, r in {**results, **bucket_sweep}.items():
        print(f"  {k:<{w}}  {r['median_ms']:8.2f} ms  algbw {r['algbw_GBps']:5.2f} GB/s  "
              f"busbw {r['busbw_GBps']:5.2f} GB/s  x{r['ratio_to_chainermn_naive']:.2f} of ChainerMN naive")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1.5, 0.8]})
    osu = data["osu_allreduce_f32"]
    a1.semilogx([r["bytes"] for r in osu], [r["busbw_GBps"] for r in osu], "o-")
    a1.set_xlabel("message bytes")
    a1.set_ylabel("busbw GB/s")
    a1.set_title(f"MPI_Allreduce float32, {data['ranks']} ranks")
    a1.grid(alpha=0.3)
    res = data["resnet50"]
    labels = list(res)
    vals = [res[k]["median_ms"] for k in labels]
    colors = ["C3" if "chainermn" in k else "C2" if "default" in k else "C7" if "MPI" in k or "dummy" in k
              else "C0" for k in labels]
    bars = a2.barh(labels, vals, color=colors)
    for b, k in zip(bars, labels):
        a2.text(b.get_width(), b.get_y() + b.get_height() / 2,
                f" {res[k]['median_ms']:.1f} ms  x{res[k]['ratio_to_chainermn_naive']:.2f}", va="center",
                fontsize=7)
    a2.invert_yaxis()
    a2.tick_params(axis="y", labelsize=7)
    a2.set_xlim(0, max(vals) * 1.35)
    a2.set_xlabel("ms per gradient mean (median)")
    la = data["loadavg_before"][0]
    a2.set_title(f"ResNet-50 grads ({data['grad_bytes'] / 1e6:.0f} MB), load {la:.1f}", fontsize=9)
    sw = data.get("bucket_sweep") or {}
    for name, color in (("flat", "C0"), ("hierarchical", "C2")):
        pts = sorted((int(k.split()[-2]), v["median_ms"]) for k, v in sw.items() if k.startswith(name))
        if pts:
            a3.semilogx([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{name} f32",
                        base=2)
    if sw:
        a3.axhline(res["chainermn naive"]["median_ms"], color="C3", ls="--", label="ChainerMN naive")
        a3.set_xlabel("bucket MiB")
        a3.set_ylabel("ms (median)")
        a3.set_title("bucket size, ResNet-50 grads", fontsize=9)
        a3.legend(fontsize=7)
        a3.grid(alpha=0.3)
    else:
        a3.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
