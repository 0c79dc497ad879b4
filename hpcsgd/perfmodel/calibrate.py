"""Fit the model's parameters to this machine from measured results.

Every function takes the files it reads or writes as arguments: nothing is
looked up relative to the source tree, so the installed package writes nowhere
inside itself. The results directory is the caller's (``hpcsgd predict
--results DIR``, ``python -m hpcsgd.perfmodel.calibrate --results DIR``).

Sources, in order of preference, inside the results directory:

* allreduce alpha/beta: ``allreduce.json`` (written by benchmarks/allreduce.py) when it
  has (bytes, seconds) points; else this module's own measurement (``mpiexec -n 2
  python -m hpcsgd.perfmodel.calibrate --results DIR``: ``MPI_Allreduce`` of float32
  buffers from 4 KiB to 16 MiB, median of repeats), stored in ``predict_calibration.json``;
* pack bandwidth: a timed float32 -> float16 copy (the cast the packer does);
* compute: ``scaling.json`` (benchmarks/scaling.py) 1-rank phases;
* overlap fraction: ``overlap.json`` (benchmarks/overlap.py).

The model's error on what was measured is computed by :mod:`hpcsgd.perfmodel.checks`
(``python -m hpcsgd.perfmodel.checks --results DIR``), which imports this module; this
module imports nothing from it.

The fit is least squares on relative error of ``T(n) = c_alpha(p) alpha + c_beta(p, n) beta``
with the algorithm's coefficients (ring at p = 2: 2 alpha + n beta).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from .costs import Level
from .model import Cluster, Device

#: File names inside a results directory.
CALIBRATION_FILE = "predict_calibration.json"
SCALING_FILE = "scaling.json"
OVERLAP_FILE = "overlap.json"
ALLREDUCE_FILE = "allreduce.json"

# Used only when nothing was measured yet (ASSUMPTION: a 2-core VM, MPICH shared memory).
DEFAULT_SHM = {"alpha": 2e-6, "beta": 1 / 3e9}
DEFAULT_MEM_BW = 5e9


def fit_alpha_beta(points: list[tuple[float, float]], p: int = 2) -> dict[str, float]:
    """Fit ring-allreduce alpha (s) and beta (s/B) to (bytes, seconds) points of p ranks.

    Coefficients: T = 2(p-1) alpha + 2(p-1)/p n beta. Minimises relative error so
    small messages (latency) and large ones (bandwidth) both count.
    """
    if len(points) < 2:
        raise ValueError("need at least two (bytes, seconds) points to fit alpha and beta")
    n = np.array([b for b, _ in points], dtype=float)
    t = np.array([s for _, s in points], dtype=float)
    a = np.stack([np.full_like(n, 2 * (p - 1)), 2 * (p - 1) / p * n], axis=1) / t[:, None]
    coef, *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    alpha, beta = float(max(coef[0], 0.0)), float(max(coef[1], 1e-15))
    pred = 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta
    return {"alpha": alpha, "beta": beta, "max_rel_error": float(np.max(np.abs(pred / t - 1))),
            "median_rel_error": float(np.median(np.abs(pred / t - 1)))}


def measure_pack_bandwidth(wire: str = "float16", n: int = 4_000_000, repeats: int = 7) -> float:
    """Bytes/s of packing float32 gradients into a ``wire`` buffer (bytes read + written).

    Uses hpcsgd's packing kernel (``hpcsgd.comm.wire_kernels.pack_into``) when it is
    importable, else the NumPy cast.
    """
    src = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    itemsize = 2 if wire in ("float16", "bfloat16") else 4
    try:
        from hpcsgd.comm import wire_kernels as kernels

        dst = np.empty(n, kernels.wire_storage_dtype(wire))
        run = lambda: kernels.pack_into(src, dst, 0.5, wire)  # noqa: E731
    except Exception:
        dst = np.empty(n, np.float16 if itemsize == 2 else np.float32)
        run = lambda: np.multiply(src, 0.5, out=dst, casting="same_kind")  # noqa: E731
    run()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return (4 + itemsize) * n / statistics.median(times)


def measure_allreduce(comm, sizes=tuple(4096 << (2 * i) for i in range(7)), repeats: int = 9) -> list:
    """(bytes, median seconds) of ``MPI_Allreduce`` on float32 buffers, timed on rank 0."""
    from mpi4py import MPI

    out = []
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, np.float32)
        res = np.empty_like(buf)
        comm.Allreduce(buf, res, op=MPI.SUM)  # warm-up
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(buf, res, op=MPI.SUM)
            times.append(time.perf_counter() - t0)
        times = comm.allreduce(statistics.median(times), op=MPI.MAX)
        out.append((nbytes, times))
    return out


def points_from_allreduce_json(path: Path) -> tuple[list, int] | None:
    """((bytes, seconds) points, ranks) of the OSU-style ``MPI_Allreduce`` sweep in
    benchmarks/allreduce.py's output; None when the file is missing or has no sweep."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        pts = [(int(r["bytes"]), float(r["us"]) * 1e-6) for r in data["osu_allreduce_f32"]]
        ranks = int(data["ranks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pts, ranks) if len(pts) >= 2 else None


def measured_overlap(path: Path, config: str | None = None) -> float | None:
    """Fraction of the allreduce hidden behind backward, from benchmarks/overlap.py's output.

    ``1 - exposed(overlapped) / exposed(no_overlap)`` of the launch without MPICH's
    async-progress thread ("plain"), where exposed = step - compute (medians of the
    same launch). ``config`` picks the overlapped configuration (default: the
    shipped default, ``poll`` with 4 MB buckets, else the best ``poll_*``/``thread_*``).
    Clamped to [0, 1]; None when the file is missing or has no such numbers.
    """
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("overlap_fraction"), (int, float)):
        return float(min(1.0, max(0.0, data["overlap_fraction"])))
    runs = data.get("runs", []) if isinstance(data, dict) else []
    run = next((r for r in runs if r.get("tag") == "plain"), runs[0] if runs else None)
    if not run or "no_overlap" not in run.get("configs", {}):
        return None
    cfgs = run["configs"]
    base = cfgs["no_overlap"]["exposed_comm_s"]
    if base <= 0:
        return None
    if config is None:
        config = "poll_4MB" if "poll_4MB" in cfgs else min(
            (k for k in cfgs if k.startswith(("poll_", "thread_"))),
            key=lambda k: cfgs[k]["exposed_comm_s"], default=None)
    if config is None or config not in cfgs:
        return None
    return float(min(1.0, max(0.0, 1.0 - cfgs[config]["exposed_comm_s"] / base)))


def load_calibration(path: Path) -> dict:
    """The calibration JSON at ``path``; {} when it is missing or unreadable (defaults apply)."""
    path = Path(path)
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {}


def local_resnet50_compute(path: Path) -> dict:
    """This machine's ResNet-50 compute per 224-px image, from scaling.json's 1-rank hpcsgd run.

    The benchmark runs ResNet-50 at a reduced size; FLOPs grow with the pixel count, so the
    per-image time is scaled by (224 / size)^2 (an ASSUMPTION: equal efficiency at both sizes).
    """
    try:
        data = json.loads(path.read_text())
        rec = next(c for c in data["configs"] if c["model"] == "resnet50" and c["ranks"] == 1
                   and c["framework"] == "hpcsgd")
    except (OSError, ValueError, KeyError, StopIteration):
        return {"per_image_s": 5.0, "backward_fraction": 2 / 3,
                "source": "ASSUMPTION: 5 s per 224-px image on one core (no scaling.json yet)"}
    ph = rec["phases_s"]
    fb = ph.get("forward", 0.0) + ph.get("backward", 0.0)
    scale = (224 / rec["image_size"]) ** 2
    return {"per_image_s": fb / rec["per_rank_batch"] * scale,
            "backward_fraction": ph.get("backward", 0.0) / fb,
            "source": f"{Path(path).name} resnet50 1 rank at {rec['image_size']} px x "
                      f"(224/{rec['image_size']})^2 (ASSUMPTION: FLOPs-proportional)"}


def local_cluster(calibration: dict, per_image_s: float = 0.01, fixed_s: float = 0.0,
                  backward_fraction: float = 2 / 3, compute_source: str = "scaling.json (1 rank)") -> Cluster:
    """This machine as a 'cluster': one node of 2 cores, MPICH shared memory between ranks.

    The emulated 2-host cluster (tests/cluster) is modelled as 2 nodes of 2 with the same
    level between nodes unless the calibration has an ``inter`` fit.
    """
    cal = calibration
    shm = cal.get("shm", DEFAULT_SHM)
    inter = cal.get("inter", shm)
    src = cal.get("source", "ASSUMPTION: defaults, nothing measured yet")
    intra = Level("MPICH shared memory (this machine)", alpha=shm["alpha"], beta=shm["beta"],
                  sources={"alpha": src, "beta": src})
    inter_level = Level("emulated inter-host (this machine)", alpha=inter["alpha"], beta=inter["beta"],
                        sources={"alpha": src, "beta": src})
    dev = Device("this machine, 1 core per rank", per_image_s=per_image_s, fixed_s=fixed_s,
                 mem_bandwidth=cal.get("mem_bandwidth", DEFAULT_MEM_BW), backward_fraction=backward_fraction,
                 cast_bandwidth=cal.get("cast_bandwidth"),
                 sources={"per_image_s": compute_source,
                          "mem_bandwidth": "timed float32 packing (hpcsgd.comm.wire_kernels.pack_into)",
                          "cast_bandwidth": "timed float32 -> float16 packing"})
    return Cluster("local", "this machine: 2 cores, MPICH shared memory", device=dev, devices_per_node=2,
                   intra=intra, inter=inter_level, max_devices=4, communicator="hierarchical",
                   inter_algorithm="ring", wire_dtype="float32", overlap=0.0,
                   update_bytes_per_param=20.0, sources={"all": src})


def measured_local_cluster(results: Path) -> Cluster:
    """This machine as a cluster, from the calibration and scaling.json in ``results``."""
    results = Path(results)
    comp = local_resnet50_compute(results / SCALING_FILE)
    return local_cluster(load_calibration(results / CALIBRATION_FILE), per_image_s=comp["per_image_s"],
                         backward_fraction=comp["backward_fraction"], compute_source=comp["source"])


def measure(results: Path) -> None:
    """Under mpiexec -n 2: time allreduce and packing, write predict_calibration.json in ``results``.

    alpha/beta come from benchmarks/allreduce.py's interleaved sweep (``results``/allreduce.json)
    when it exists, else from this measurement; both fits are recorded.
    """
    from mpi4py import MPI

    results = Path(results)
    comm = MPI.COMM_WORLD
    pts = measure_allreduce(comm)
    bw, cast = measure_pack_bandwidth("float32"), measure_pack_bandwidth("float16")
    if comm.rank != 0:
        return
    own = fit_alpha_beta(pts, comm.size)
    out = {"source": f"hpcsgd.perfmodel.calibrate: MPI_Allreduce float32, {comm.size} ranks, median of 9",
           "ranks": comm.size, "points": pts, "fit_own": own,
           "shm": {"alpha": own["alpha"], "beta": own["beta"]},
           "mem_bandwidth": bw, "cast_bandwidth": cast, "loadavg": os.getloadavg(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    other = points_from_allreduce_json(results / ALLREDUCE_FILE)
    if other:
        fit = fit_alpha_beta(*other)
        out.update(fit_allreduce_json=fit, shm={"alpha": fit["alpha"], "beta": fit["beta"]},
                   source="allreduce.json OSU sweep (benchmarks/allreduce.py), fitted by "
                          "hpcsgd.perfmodel.calibrate")
    results.mkdir(parents=True, exist_ok=True)
    (results / CALIBRATION_FILE).write_text(json.dumps(out, indent=1))
    keys = ("source", "shm", "fit_own", "fit_allreduce_json", "mem_bandwidth", "cast_bandwidth", "loadavg")
    print(json.dumps({k: out.get(k) for k in keys}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcsgd.perfmodel.calibrate",
                                description="measure this machine (run under mpiexec -n 2)")
    p.add_argument("--results", type=Path, required=True,
                   help="results directory: reads allreduce.json, writes predict_calibration.json")
    measure(p.parse_args(argv).results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
