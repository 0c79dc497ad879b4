"""ResNet-50 gradient averaging across 2 emulated hosts x 2 ranks over a shaped link.

Builds 2 emulated hosts (tests/cluster/netns.py: network namespaces, veth, bridge) whose
links are shaped with tbf to ``--rate`` in each direction, then launches 4 ranks with
MPICH's hydra (2 per host) and times one gradient averaging of ResNet-50's 25,557,032
parameters (161 arrays, 102 MB in float32) per method:

* ``hierarchical_fp16``: hpcsgd's default, ``create_communicator('hierarchical',
  allreduce_grad_dtype='float16')``: reduce-scatter inside the host (shared memory),
  allreduce of each half between the hosts in float16, allgather inside the host.
* ``chainermn_naive``: ChainerMN's NaiveCommunicator algorithm: one MPI Allreduce (SUM,
  float32) per parameter, then a scale by 1/size. Written here with mpi4py (ChainerMN is
  not installed), and hpcsgd's ``naive`` communicator when it exists.
* ``mpi_packed_fp32``: pack all gradients into one float32 buffer, one MPI Allreduce,
  unpack (ChainerMN's flat communicator without its fp16 option).

Each method: 1 warm-up, then ``--repeats`` timed runs; a run is timed from a barrier to
the slowest rank's end; the median is reported with the bytes the host sent over its
link (read from the namespace's interface counters). Run as root:

    OPENBLAS_CORETYPE=SkylakeX python benchmarks/cluster_allreduce.py --rate 1gbit,250mbit

Timing caveat: 4 ranks share this machine's cores (oversubscribed on 2 cores), so the
CPU parts (packing, float16 casts, shared-memory copies) are slower than on real hosts;
the link is shaped slow enough that transfers dominate.
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
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks._machine import machine  # noqa: E402

# -- rank side ------------------------------------------------------------------------

def _model_from_shapes(shapes: list[list[int]]):
    import chainer
    import numpy as np

    link = chainer.Link()
    with link.init_scope():
        for i, s in enumerate(shapes):
            setattr(link, f"p{i:03d}", chainer.Parameter(np.zeros(s, np.float32)))
    return link


def _iface_tx() -> int:
    """Bytes sent so far by this namespace's non-loopback interfaces."""
    total = 0
    for d in Path("/sys/class/net").iterdir():
        if d.name != "lo":
            total += int((d / "statistics" / "tx_bytes").read_text())
    return total


def rank_main(shapes_file: str, repeats: int, out_file: str) -> None:
    import numpy as np
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    shapes = json.loads(Path(shapes_file).read_text())
    model = _model_from_shapes(shapes)
    params = sorted(model.namedparams())
    rng = np.random.default_rng(world.rank)
    grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params}

    def reset():
        for n, p in params:
            p.grad = grads[n].copy()

    n_total = sum(int(np.prod(s)) for s in shapes)
    methods, errors = _methods(world, model, params, n_total)
    first_name, first_param = params[0]
    ref = np.mean([np.random.default_rng(r).standard_normal(first_param.shape).astype(np.float64)
                   for r in range(world.size)], axis=0)
    results = {}
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    for label, fn in methods.items():
        times, sent = _time_method(world, local, fn, reset, repeats)
        err = float(np.max(np.abs(first_param.grad.astype(np.float64) - ref)))
        results[label] = {"median_s": statistics.median(times), "times_s": times,
                          "host_tx_bytes": int(statistics.median(sent)),
                          f"max_abs_error_{first_name}": err}
    if world.rank == 0:
        Path(out_file).write_text(json.dumps({"methods": results, "missing": errors,
                                              "params": n_total, "arrays": len(shapes)}))


def _methods(world, model, params, n_total: int) -> tuple[dict, dict]:
    """The allreduces compared: ``{label: fn}``, and ``{label: why missing}`` for those not built."""
    import numpy as np
    from mpi4py import MPI

    def chainermn_naive():
        for _, p in params:
            buf = np.empty_like(p.grad)
            world.Allreduce(p.grad, buf, op=MPI.SUM)
            p.grad = buf * np.float32(1.0 / world.size)

    packed = np.empty(n_total, np.float32)
    reduced = np.empty_like(packed)

    def mpi_packed_fp32():
        off = 0
        for _, p in params:
            packed[off:off + p.size] = p.grad.ravel()
            off += p.size
        world.Allreduce(packed, reduced, op=MPI.SUM)
        np.multiply(reduced, np.float32(1.0 / world.size), out=reduced)
        off = 0
        for _, p in params:
            p.grad[...] = reduced[off:off + p.size].reshape(p.shape)
            off += p.size

    methods = {"chainermn_naive": chainermn_naive, "mpi_packed_fp32": mpi_packed_fp32}
    errors = {}
    import hpcsgd
    from hpcsgd.comm import communicator_class

    for label, name, kw in (("hierarchical_fp16", "hierarchical", {"allreduce_grad_dtype": "float16"}),
                            ("hpcsgd_naive", "naive", {})):
        try:
            communicator_class(name)
        except ValueError as e:
            errors[label] = str(e)
            continue
        comm = hpcsgd.create_communicator(name, **kw)
        methods[label] = (lambda c: (lambda: c.multi_node_mean_grad(model)))(comm)
    return methods, errors


def _time_method(world, local, fn, reset, repeats: int) -> tuple[list, list]:
    """``repeats`` timings of ``fn`` after one warm-up: the slowest rank's seconds, and the bytes the
    nodes' interfaces sent (the most of any node, read by each node's first rank)."""
    from mpi4py import MPI

    times, sent = [], []
    for rep in range(repeats + 1):
        reset()
        world.Barrier()
        tx0 = _iface_tx() if local.rank == 0 else 0
        t0 = MPI.Wtime()
        fn()
        t = MPI.Wtime() - t0
        slowest = world.allreduce(t, op=MPI.MAX)
        tx = world.allreduce((_iface_tx() - tx0) if local.rank == 0 else 0, op=MPI.MAX)
        if rep > 0:
            times.append(slowest)
            sent.append(tx)
    return times, sent


# -- driver -----------------------------------------------------------------------------

def resnet50_shapes() -> list[list[int]]:
    from hpcsgd.models import build_model

    model = build_model("resnet50", 1000)
    return [list(p.shape) for _, p in sorted(model.namedparams())]


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    rates = list(runs)
    labels = list(runs[rates[0]]["methods"])
    fig, axes = plt.subplots(1, len(rates), figsize=(5.2 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        methods = runs[rate]["methods"]
        med = [methods[k]["median_s"] for k in labels]
        bars = ax.barh(labels, med, color=["C2" if "hier" in k else "C0" for k in labels])
        for b, k in zip(bars, labels):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                    f" {methods[k]['median_s']:.2f} s, {methods[k]['host_tx_bytes'] / 1e6:.0f} MB/host",
                    va="center", fontsize=8)
        ax.set_xlabel("s per ResNet-50 gradient averaging (median)")
        ratio = runs[rate]["ratios"].get("chainermn_naive/hierarchical_fp16")
        ax.set_title(f"link {rate} (tbf)" + (f": {ratio:.2f}x vs ChainerMN naive" if ratio else ""),
                     fontsize=9)
        ax.set_xlim(0, max(med) * 1.6)
    fig.suptitle("2 emulated hosts x 2 ranks (4 ranks on 2 cores: CPU oversubscribed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ratios(m: dict) -> dict:
    out = {}
    if "hierarchical_fp16" in m:
        for base in ("chainermn_naive", "mpi_packed_fp32", "hpcsgd_naive"):
            if base in m:
                out[f"{base}/hierarchical_fp16"] = m[base]["median_s"] / m["hierarchical_fp16"]["median_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="1gbit,250mbit",
                   help="comma-separated tbf rates of each host's link (each direction), one run per rate")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "cluster_allreduce.json")
    p.add_argument("--rank-side", nargs=3, metavar=("SHAPES", "REPEATS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_side:
        rank_main(args.rank_side[0], int(args.rank_side[1]), args.rank_side[2])
        return 0

    from cluster.netns import EmulatedCluster, unavailable_reason
    from mpi_harness import mpiexec_path

    reason = unavailable_reason()
    if reason:
        print(f"cannot build the emulated cluster: {reason}", file=sys.stderr)
        return 2
    shapes = resnet50_shapes()
    tmp = Path(tempfile.mkdtemp(prefix="hpcsgd-cluster-bench-"))
    (tmp / "shapes.json").write_text(json.dumps(shapes))
    t0 = time.time()
    data = {"runs": {}, "hosts": 2, "ranks_per_host": 2, "repeats": args.repeats, "cpus": os.cpu_count(),
            "machine": machine(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "note": "4 ranks on this machine's cores (oversubscribed): CPU work (packing, casts, MPI over "
                    "TCP) is slower than on real hosts; lower rates make the link dominate. "
                    "UCX_TLS=tcp,self so inter-host traffic crosses the shaped veth link."}
    with EmulatedCluster(n_hosts=2) as cluster:
        env = dict(os.environ, **cluster.env(), PYTHONPATH=str(ROOT))
        for rate in args.rate.split(","):
            cluster.shape(rate)
            cmd = [mpiexec_path(), *cluster.mpiexec_args(ranks_per_host=2), "-n", "4", sys.executable,
                   str(Path(__file__).resolve()), "--rank-side", str(tmp / "shapes.json"), str(args.repeats),
                   str(tmp / "out.json")]
            load_before = os.getloadavg()
            res = subprocess.run(cmd, env=env, cwd=str(ROOT), timeout=1800, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
                return 1
            run = json.loads((tmp / "out.json").read_text())
            run.update(rate=rate, ratios=_ratios(run["methods"]), loadavg_before=load_before,
                       loadavg_after=os.getloadavg())
            data["runs"][rate] = run
            for k, v in run["methods"].items():
                print(f"{rate:8s} {k:20s} {v['median_s']:.3f} s  {v['host_tx_bytes'] / 1e6:7.1f} MB/host")
            for k, v in run["ratios"].items():
                print(f"{rate:8s} ratio {k}: {v:.2f}x")
            for k, v in run["missing"].items():
                print(f"missing {k}: {v}")
    data["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
