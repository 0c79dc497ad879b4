"""``hpcsgd predict``: time-to-train on a cluster (ResNet-50 unless the cluster says), with its breakdown.

    hpcsgd predict --cluster mn1 --gpus 1024 --global-batch 32768 --epochs 90
    hpcsgd predict --published              # in-sample and held-out papers, model vs. published
    hpcsgd predict --cluster mn1 --sweep --out DIR/sweep   # efficiency vs GPUs (PNG + JSON)
    hpcsgd predict --cluster mn1 --sources  # every parameter with its source tag
    hpcsgd predict --cluster local --results DIR   # this machine, from benchmark results in DIR

Nothing is read or written unless a path is given (--out, --results).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import ConfigError
from .calibrate import OVERLAP_FILE, measured_local_cluster, measured_overlap
from .clusters import CLUSTER_NAMES, PUBLISHED, get_cluster
from .costs import COMMUNICATORS, INTER_ALGORITHMS
from .heldout import heldout_table, spread
from .model import RESNET50, Cluster, Prediction, predict

SWEEP_DEVICES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default="mn1", choices=CLUSTER_NAMES)
    p.add_argument("--gpus", "--devices", dest="devices", type=int, default=None,
                   help="devices (GPUs, KNL nodes, ranks); default: the published run's count")
    p.add_argument("--global-batch", type=int, default=None, help="images per iteration over all devices")
    p.add_argument("--epochs", type=float, default=90.0)
    p.add_argument("--communicator", choices=COMMUNICATORS, default=None,
                   help="allreduce structure (default: what the published run used)")
    p.add_argument("--inter-algorithm", choices=INTER_ALGORITHMS, default=None)
    p.add_argument("--dtype", choices=("float16", "float32"), default=None, help="gradient wire format")
    p.add_argument("--overlap", default=None,
                   help="fraction of the allreduce hidden behind backward, 0..1, or 'measured' "
                        "(overlap.json in --results)")
    p.add_argument("--results", type=Path, default=None,
                   help="directory of benchmark results (predict_calibration.json, scaling.json, "
                        "overlap.json); needed by --cluster local and --overlap measured")
    p.add_argument("--jitter-cv", type=float, default=None,
                   help="relative std of per-iteration compute (adds the straggler term)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.add_argument("--published", action="store_true", help="reproduce the published runs and exit")
    p.add_argument("--sources", action="store_true", help="list every parameter with its source")
    p.add_argument("--sweep", action="store_true",
                   help="plot efficiency vs device count for each communicator and dtype")
    p.add_argument("--out", default=None, help="path prefix for --sweep output (.json, .png); required")


def _overlap(value: str | None, results: Path | None) -> float | None:
    if value is None:
        return None
    if value == "measured":
        if results is None:
            raise ConfigError("--overlap measured needs --results DIR (the directory holding overlap.json)")
        ov = measured_overlap(results / OVERLAP_FILE)
        if ov is None:
            raise ConfigError(f"--overlap measured: {results / OVERLAP_FILE} has no overlap fraction")
        return ov
    try:
        ov = float(value)
    except ValueError:
        raise ConfigError(f"--overlap must be a number in [0, 1] or 'measured', got {value!r}") from None
    if not 0.0 <= ov <= 1.0:
        raise ConfigError(f"--overlap must be in [0, 1], got {ov}")
    return ov


def format_prediction(p: Prediction, description: str = "") -> str:
    ms = lambda s: f"{s * 1e3:10.2f}"  # noqa: E731
    ar = p.allreduce
    lines = [
        f"{p.workload} on {p.cluster}" + (f": {description}" if description else ""),
        f"  {p.devices} devices = {p.nodes} nodes x {p.devices // p.nodes}, global batch {p.global_batch} "
        f"({p.per_device_batch} per device), {p.epochs:g} epochs = {p.iterations} iterations",
        f"  communicator {p.communicator} (inter-node {p.inter_algorithm}), wire {p.wire_dtype}, "
        f"overlap {p.overlap:.2f}" + ("  [EXTRAPOLATED beyond the real machine]" if p.extrapolated else ""),
        "per iteration (ms):",
        f"  forward       {ms(p.forward_s)}",
        f"  backward      {ms(p.backward_s)}",
        f"  update        {ms(p.update_s)}",
        f"  straggler     {ms(p.straggler_s)}",
        f"  pack+unpack   {ms(p.pack_s)}",
        f"  allreduce     {ms(ar.total)}   (latency {ar.latency * 1e3:.2f}, bandwidth "
        f"{ar.bandwidth * 1e3:.2f}, reduction {ar.reduction * 1e3:.2f})",
        f"  exposed comm  {ms(p.exposed_comm_s)}   (hidden behind backward: "
        f"{(p.comm_s - p.exposed_comm_s) * 1e3:.2f})",
        f"  exposed data  {ms(p.exposed_data_s)}",
        f"  iteration     {ms(p.iteration_s)}",
        f"throughput {p.images_per_s:,.0f} images/s, weak-scaling efficiency {p.efficiency:.1%}",
        f"predicted time-to-train: {p.time_to_train_s / 60:.1f} min ({p.time_to_train_s:,.0f} s)",
    ]
    return "\n".join(lines)


def _cluster(name: str, results: Path | None) -> Cluster:
    if name == "local":
        if results is None:
            raise ConfigError("--cluster local is built from this machine's measurements: pass --results DIR")
        return measured_local_cluster(results)
    return get_cluster(name)


def published_table(overlap: float | None = None) -> list[dict]:
    """Model vs. the three in-sample published runs (one dict per run)."""
    rows = []
    for run in PUBLISHED:
        c = get_cluster(run.cluster)
        p = predict(c, run.devices, run.global_batch, run.epochs, overlap=overlap)
        row = {"key": run.key, "paper": run.paper, "cluster": run.cluster, "devices": run.devices,
               "global_batch": run.global_batch, "published_s": run.seconds,
               "predicted_s": p.time_to_train_s, "error": p.time_to_train_s / run.seconds - 1,
               "predicted_iteration_s": p.iteration_s, "source": run.source,
               "published_efficiency": run.efficiency}
        if run.efficiency_baseline_devices > 1:
            b = run.efficiency_baseline_devices
            base = predict(c, b, run.global_batch // run.devices * b, run.epochs, overlap=overlap)
            row["predicted_efficiency"] = base.iteration_s / p.iteration_s
        else:
            row["predicted_efficiency"] = p.efficiency
        row["efficiency_baseline_devices"] = run.efficiency_baseline_devices
        rows.append(row)
    return rows


SWEEP_COMMUNICATORS = ("nccl", "leader", "hierarchical")


def sweep(c: Cluster, per_device_batch: int, fixed_global_batch: int, epochs: float,
          overlap: float | None = None) -> dict:
    """Weak-scaling efficiency and fixed-batch time-to-train for each communicator x dtype."""
    out = {"cluster": c.name, "max_devices": c.max_devices, "per_device_batch": per_device_batch,
           "fixed_global_batch": fixed_global_batch, "epochs": epochs, "series": []}
    devices = [d for d in SWEEP_DEVICES if d >= c.devices_per_node]
    for comm in SWEEP_COMMUNICATORS:
        for dtype in ("float16", "float32"):
            weak, strong = [], []
            for d in devices:
                p = predict(c, d, per_device_batch * d, epochs, communicator=comm, wire_dtype=dtype,
                            overlap=overlap)
                weak.append({"devices": d, "efficiency": p.efficiency, "iteration_s": p.iteration_s,
                             "exposed_comm_s": p.exposed_comm_s, "latency_s": p.allreduce.latency,
                             "bandwidth_s": p.allreduce.bandwidth})
                if fixed_global_batch % d == 0:
                    q = predict(c, d, fixed_global_batch, epochs, communicator=comm, wire_dtype=dtype,
                                overlap=overlap)
                    strong.append({"devices": d, "per_device_batch": q.per_device_batch,
                                   "time_to_train_s": q.time_to_train_s, "efficiency": q.efficiency})
            out["series"].append({"communicator": comm, "dtype": dtype, "weak": weak, "fixed_batch": strong})
    return out


def plot_sweep(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in data["series"]:
        style = "-" if s["dtype"] == "float16" else "--"
        label = f"{s['communicator']} {s['dtype']}"
        a.plot([r["devices"] for r in s["weak"]], [r["efficiency"] for r in s["weak"]], style, marker="o",
               ms=3, label=label)
        fixed = s["fixed_batch"]
        b.plot([r["devices"] for r in fixed], [r["time_to_train_s"] / 60 for r in fixed],
               style, marker="o", ms=3, label=label)
    a.set(xscale="log", xlabel="devices", ylabel="weak-scaling efficiency",
          title=f"{data['cluster']}: {data['per_device_batch']} images/device", ylim=(0, 1.05))
    b.set(xscale="log", yscale="log", xlabel="devices", ylabel="time to train (min)",
          title=f"{data['cluster']}: global batch {data['fixed_global_batch']}, {data['epochs']:g} epochs")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        if data.get("max_devices"):
            ax.axvline(data["max_devices"], color="gray", ls=":", lw=1)
            ax.text(data["max_devices"], ax.get_ylim()[0], " real machine | extrapolated", fontsize=7,
                    color="gray", va="bottom")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_sources(c: Cluster) -> None:
    print(f"{c.name}: {c.description}")
    groups = (("cluster", c.sources), (f"device {c.device.name}", c.device.sources),
              (f"intra {c.intra.name if c.intra else '-'}", c.intra.sources if c.intra else {}),
              (f"inter {c.inter.name}", c.inter.sources),
              (f"workload {(c.workload or RESNET50).name}", (c.workload or RESNET50).sources))
    for owner, sources in groups:
        print(f"  [{owner}]")
        for k, v in sources.items():
            print(f"    {k}: {v}")
    d = {k: v for k, v in asdict(c).items() if k not in ("sources",)}
    print("  values:", json.dumps(d, default=str, indent=None)[:2000])


def print_published(overlap: float | None) -> None:
    """Both tables: in-sample runs, then held-out runs, every number computed now."""
    rows = published_table(overlap)
    print("In-sample (device compute derived from the same papers' small runs):")
    print(f"  {'run':13s} {'devices':>7s} {'batch':>6s} {'published':>10s} {'predicted':>10s} {'error':>7s} "
          f"{'eff pub':>7s} {'eff model':>9s}")
    for r in rows:
        pe = f"{r['published_efficiency']:.0%}" if r["published_efficiency"] else "-"
        print(f"  {r['key']:13s} {r['devices']:7d} {r['global_batch']:6d} {r['published_s'] / 60:8.1f} m "
              f"{r['predicted_s'] / 60:8.1f} m {r['error']:+7.1%} {pe:>7s} {r['predicted_efficiency']:9.0%}")
    held = heldout_table(overlap)
    print("Held-out (every parameter from public specs or small benchmarks; nothing fitted to these runs):")
    print(f"  {'run':13s} {'cluster':14s} {'devices':>7s} {'batch':>13s} {'metric':>6s} {'published':>10s} "
          f"{'predicted':>10s} {'error':>7s}  overlap 0..1")
    for r in held:
        unit, scale = ("s", 1.0) if r["metric"] == "time_to_train_s" else ("ms", 1e3)
        metric = "time" if r["metric"] == "time_to_train_s" else "iter"
        batch = "->".join(str(b) for b in r["global_batch"])
        lo, hi = r["error_range_overlap"]
        print(f"  {r['key']:13s} {r['cluster']:14s} {r['devices']:7d} {batch:>13s} {metric:>6s} "
              f"{r['published'] * scale:8.1f}{unit:>2s} {r['predicted'] * scale:8.1f}{unit:>2s} "
              f"{r['error']:+7.1%}  {lo:+.0%}..{hi:+.0%}")
    sp = spread(held)
    print(f"Held-out spread: {sp['n']} runs, errors {sp['min']:+.0%} to {sp['max']:+.0%}, "
          f"median |error| {sp['median_abs']:.0%}")


def main(args: argparse.Namespace) -> int:
    overlap = _overlap(args.overlap, args.results)
    if args.published:
        if args.json:
            print(json.dumps({"in_sample": published_table(overlap), "held_out": heldout_table(overlap),
                              "held_out_spread": spread(heldout_table(overlap))}, indent=1))
        else:
            print_published(overlap)
        return 0
    try:
        c = _cluster(args.cluster, args.results)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.sources:
        _print_sources(c)
        return 0
    run = next((r for r in PUBLISHED if r.cluster == args.cluster), None)
    devices = args.devices or (run.devices if run else c.devices_per_node)
    batch = args.global_batch or (run.global_batch if run else 32 * devices)
    if args.jitter_cv is not None:
        c = replace(c, jitter_cv=args.jitter_cv)
    if args.sweep:
        if not args.out:
            raise ConfigError("--sweep writes a JSON and a PNG: pass --out PATH_PREFIX")
        data = sweep(c, max(1, batch // devices), batch, args.epochs, overlap)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(data, f, indent=1)
        plot_sweep(data, args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")
        for s in data["series"]:
            row = " ".join(f"{r['devices']}:{r['efficiency']:.0%}" for r in s["weak"])
            print(f"  {s['communicator']:16s} {s['dtype']:8s} {row}")
        return 0
    try:
        p = predict(c, devices, batch, args.epochs, communicator=args.communicator,
                    inter_algorithm=args.inter_algorithm, wire_dtype=args.dtype, overlap=overlap)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(p.as_dict(), indent=1))
        return 0
    print(format_prediction(p, c.description))
    if run and run.devices == devices and run.global_batch == batch and run.epochs == args.epochs:
        err = p.time_to_train_s / run.seconds - 1
        print(f"published: {run.paper}: {run.seconds / 60:.1f} min ({run.source}); model error {err:+.1%}")
    return 0
