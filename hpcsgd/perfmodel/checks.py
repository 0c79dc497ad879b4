"""The model against what was measured on this machine: allreduce cases, steps, the emulated cluster.

All inputs are files of one results directory passed by the caller:

* :func:`allreduce_model_check`: each ResNet-50 gradient-averaging case of
  benchmarks/allreduce.py (``allreduce.json``) vs. the model with the calibrated
  shared-memory level; every case is modelled under its runtime communicator's name;
* :func:`model_errors`: every multi-rank step of benchmarks/scaling.py (``scaling.json``),
  predicted from the same model's 1-rank step (compute) + the communication model;
* :func:`cluster_model_check`: benchmarks/cluster_allreduce.py (``cluster_allreduce.json``,
  2 emulated hosts x 2 ranks, link shaped to a known rate): the inter-node bandwidth term
  against a link whose bandwidth is known by construction;
* :func:`report` writes all of it to ``predict_local.json`` in the same directory
  (``python -m hpcsgd.perfmodel.checks --results DIR``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .calibrate import (
    ALLREDUCE_FILE,
    CALIBRATION_FILE,
    OVERLAP_FILE,
    SCALING_FILE,
    load_calibration,
    local_cluster,
    measured_overlap,
)
from .costs import (
    Level,
    allreduce_cost,
    dtype_bytes,
    pack_cost,
    ring_allgather,
    ring_allreduce,
    ring_reduce_scatter,
)
from .model import Cluster, Workload, predict

#: ASSUMPTION: per-message latency of MPICH over TCP on a veth pair between namespaces.
VETH_TCP_ALPHA = 50e-6


def _allreduce_case(name: str, params: int, arrays: int) -> dict | None:
    """How the model computes one ResNet-50 case of benchmarks/allreduce.py, from its name."""
    key = name.lower()
    wire = "float16" if ("float16" in key or "fp16" in key) else "float32"
    if "chainermn" in key and "naive" in key:
        return {"communicator": "naive", "calls": arrays, "pack": False, "batched": False, "wire": wire}
    if "hpcsgd" not in key and "mpi" in key:
        calls = max(1, -(-4 * params // (4 << 20))) if "bucket" in key or "mib" in key else 1
        return {"communicator": "naive", "calls": calls, "pack": False, "batched": True, "wire": wire}
    if "hpcsgd" in key:
        for comm in ("hierarchical", "flat", "naive"):
            if comm in key:
                return {"communicator": comm, "calls": arrays if comm == "naive" else 1, "pack": True,
                        "batched": comm != "naive", "wire": wire}
    return None


def allreduce_model_check(path: Path, calibration: dict) -> list:
    """Model vs. measured ResNet-50 gradient mean for each communicator of benchmarks/allreduce.py."""
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    cluster = local_cluster(calibration)
    params, arrays, ranks = int(data["elements"]), int(data["arrays"]), int(data["ranks"])
    dev = cluster.device
    rows = []
    for name, res in data.get("resnet50", {}).items():
        case = _allreduce_case(name, params, arrays)
        if case is None:
            continue
        nbytes = params * dtype_bytes(case["wire"])
        ar = allreduce_cost(case["communicator"], nbytes, 1, ranks, cluster.intra, cluster.inter, "ring",
                            case["calls"])
        pack = 0.0
        if case["pack"] or not case["batched"]:
            bw = dev.cast_bandwidth if case["wire"] != "float32" and dev.cast_bandwidth else dev.mem_bandwidth
            pack = pack_cost(params, 4, dtype_bytes(case["wire"]), bw, case["calls"], cluster.per_array_s,
                             case["batched"])
        predicted, measured = ar.total + pack, res["median_ms"] * 1e-3
        rows.append({"case": name, "measured_s": measured, "predicted_s": predicted,
                     "error": predicted / measured - 1, "latency_s": ar.latency, "bandwidth_s": ar.bandwidth,
                     "pack_s": pack})
    return rows


def _framework_comm(c: dict, overlap_fraction: float) -> tuple[str, int, float]:
    """(model communicator, allreduce calls per step, overlap fraction) of a scaling.json record."""
    fw = c.get("framework", "hpcsgd")
    if fw == "chainermn":  # naive: one MPI allreduce per parameter array, unbatched copies
        return "naive", c.get("param_arrays", 1), 0.0
    if fw in ("hpcsgd-overlap", "hpcsgd-nooverlap"):  # one MPI allreduce per 4 MiB bucket
        buckets = max(1, -(-4 * c["params"] // (4 << 20)))
        return "naive", buckets, overlap_fraction if fw == "hpcsgd-overlap" else 0.0
    return c.get("communicator", "hierarchical"), c.get("param_arrays", 1), 0.0


def model_errors(scaling: dict, calibration: dict, overlap_fraction: float = 0.0) -> list[dict]:
    """Predicted vs. measured iteration time for every multi-rank config in scaling.json.

    Compute (forward + backward per image) is the median over all frameworks' 1-rank runs of
    the same model (they run the same model and kernels; pooling damps the load noise), the
    update time is the same framework's 1-rank update; the multi-rank runs are then predicted
    from the calibrated
    communication model (hpcsgd hierarchical; ChainerMN naive = one allreduce per array;
    the bucketed reducer = one allreduce per bucket, overlapped by ``overlap_fraction``,
    the fraction benchmarks/overlap.py measured: :func:`~hpcsgd.perfmodel.calibrate.measured_overlap`).
    """
    rows = []
    configs = scaling.get("configs", [])
    singles = {(c["model"], c.get("framework", "hpcsgd")): c for c in configs if c["ranks"] == 1}
    pooled: dict[str, list] = {}
    for (model, _), one in singles.items():
        ph = one["phases_s"]
        pooled.setdefault(model, []).append(
            ((ph.get("forward", 0) + ph.get("backward", 0)) / one["per_rank_batch"],
             ph.get("backward", 0) / max(1e-12, ph.get("forward", 0) + ph.get("backward", 0))))
    for c in configs:
        fw = c.get("framework", "hpcsgd")
        one = singles.get((c["model"], fw))
        if c["ranks"] == 1 or one is None:
            continue
        ph = one["phases_s"]
        b = one["per_rank_batch"]
        per_image, bwd_frac = sorted(pooled[c["model"]])[(len(pooled[c["model"]]) - 1) // 2]
        cluster = local_cluster(calibration, per_image_s=per_image, backward_fraction=bwd_frac)
        cluster = _replace_update(cluster, ph.get("update", 0.0), c["params"])
        comm_name, calls, overlap = _framework_comm(c, overlap_fraction)
        batched = fw != "chainermn"
        wl = Workload(c["model"], params=c["params"], param_arrays=calls, dataset_images=10**6)
        nodes = c.get("nodes", 1)
        cl = replace(cluster, devices_per_node=c["ranks"] // nodes, max_devices=max(4, c["ranks"]),
                     batched_pack=batched)
        p = predict(cl, c["ranks"], b * c["ranks"], 1, wl, communicator=comm_name,
                    wire_dtype=c.get("wire_dtype", "float32"), overlap=overlap)
        measured = c["iteration_s"]
        rows.append({"model": c["model"], "framework": fw, "ranks": c["ranks"], "nodes": nodes,
                     "measured_s": measured, "predicted_s": p.iteration_s,
                     "error": p.iteration_s / measured - 1,
                     "predicted_comm_s": p.comm_s, "predicted_exposed_comm_s": p.exposed_comm_s,
                     "measured_comm_s": sum(c["phases_s"].get(k, 0) for k in ("pack", "allreduce", "unpack")),
                     "overlap_used": overlap})
        mc = rows[-1]["measured_comm_s"]
        rows[-1]["comm_error"] = p.comm_s / mc - 1 if mc > 0 else None
    return rows


def _replace_update(cluster: Cluster, update_s: float, params: int) -> Cluster:
    """Set update_bytes_per_param so the model's update time equals the measured one."""
    if update_s <= 0 or params <= 0:
        return cluster
    return replace(cluster, update_bytes_per_param=update_s * cluster.device.mem_bandwidth / params)


def _rate_bits(rate: str) -> float:
    """'1gbit' -> 1e9, '250mbit' -> 250e6 (tc's units)."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"cannot read link rate {rate!r}")


def cluster_model_check(path: Path, calibration: dict) -> list:
    """Model vs. benchmarks/cluster_allreduce.py: 2 emulated hosts x 2 ranks over a shaped link.

    Inter level: beta = 8 / rate (the tbf rate, known by construction), alpha =
    :data:`VETH_TCP_ALPHA` (ASSUMPTION). Intra level and packing bandwidths: the calibration.
    Methods: ``hierarchical_fp16`` (hpcsgd: float32 reduce-scatter/allgather in the host,
    float16 shard allreduce between hosts), ``mpi_packed_fp32`` (one MPICH allreduce, which is
    SMP-aware: node reduce, leaders, broadcast), ``*_naive`` (one such allreduce per array,
    unbatched copies).
    """
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    base = local_cluster(calibration)
    dev, intra = base.device, base.intra
    hosts, k = int(data.get("hosts", 2)), int(data.get("ranks_per_host", 2))
    rows = []
    for rate, run in data.get("runs", {}).items():
        inter = Level(f"veth {rate}", alpha=VETH_TCP_ALPHA, beta=8 / _rate_bits(rate))
        n_el, arrays = int(run["params"]), int(run["arrays"])
        for name, res in run.get("methods", {}).items():
            if name == "hierarchical_fp16":
                shard = 2 * n_el / k  # float16 bytes of one rank's shard
                between = ring_allreduce(shard, hosts, inter)
                comm = (ring_reduce_scatter(4 * n_el, k, intra) + ring_allgather(4 * n_el, k, intra)).total \
                    + k * between.bandwidth + between.latency + between.reduction  # k shards share the link
                pack = pack_cost(n_el, 4, 2, dev.cast_bandwidth or dev.mem_bandwidth)
            elif name == "mpi_packed_fp32":
                comm = allreduce_cost("flat", 4 * n_el, hosts, k, intra, inter).total
                pack = pack_cost(n_el, 4, 4, dev.mem_bandwidth)
            elif name.endswith("_naive"):
                comm = allreduce_cost("naive", 4 * n_el, hosts, k, intra, inter, param_arrays=arrays).total
                pack = pack_cost(n_el, 4, 4, dev.mem_bandwidth, arrays, base.per_array_s, batched=False)
            else:
                continue
            measured = res["median_s"]
            rows.append({"rate": rate, "method": name, "measured_s": measured, "predicted_s": comm + pack,
                         "error": (comm + pack) / measured - 1, "link_seconds_at_rate": res.get(
                             "host_tx_bytes", 0) * 8 / _rate_bits(rate)})
    return rows


def report(results: Path) -> dict:
    """The model's error on everything measured in ``results``; writes predict_local.json there."""
    results = Path(results)
    cal = load_calibration(results / CALIBRATION_FILE)
    scaling_path = results / SCALING_FILE
    scaling = json.loads(scaling_path.read_text()) if scaling_path.exists() else {}
    overlap = measured_overlap(results / OVERLAP_FILE)
    keys = ("source", "shm", "mem_bandwidth", "cast_bandwidth", "loadavg", "time")
    rep = {"calibration": {k: cal.get(k) for k in keys},
           "overlap_fraction_measured": overlap,
           "allreduce": allreduce_model_check(results / ALLREDUCE_FILE, cal),
           "steps": model_errors(scaling, cal, overlap or 0.0),
           "cluster": cluster_model_check(results / "cluster_allreduce.json", cal)}
    (results / "predict_local.json").write_text(json.dumps(rep, indent=1))
    for r in rep["allreduce"]:
        print(f"allreduce {r['case']:36s} measured {r['measured_s'] * 1e3:8.2f} ms  predicted "
              f"{r['predicted_s'] * 1e3:8.2f} ms  {r['error']:+6.1%}")
    for r in rep["cluster"]:
        print(f"cluster {r['rate']:8s} {r['method']:20s} measured {r['measured_s'] * 1e3:8.1f} ms  predicted "
              f"{r['predicted_s'] * 1e3:8.1f} ms  {r['error']:+6.1%}  "
              f"(link alone {r['link_seconds_at_rate']:.2f} s)")
    for r in rep["steps"]:
        ce = f"{r['comm_error']:+.0%}" if r.get("comm_error") is not None else "-"
        print(f"step {r['model']:12s} {r['framework']:16s} n={r['ranks']} "
              f"measured {r['measured_s'] * 1e3:8.1f} ms  predicted {r['predicted_s'] * 1e3:8.1f} ms  "
              f"{r['error']:+6.1%}  (comm only {ce})")
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcsgd.perfmodel.checks",
                                description="the model's error on what was measured on this machine")
    p.add_argument("--results", type=Path, required=True,
                   help="results directory (allreduce.json, scaling.json, cluster_allreduce.json, "
                        "overlap.json, predict_calibration.json); predict_local.json is written there")
    report(p.parse_args(argv).results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
