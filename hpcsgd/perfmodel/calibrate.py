"""Fit the model's parameters to this machine and report its error on measured cases.

Sources, in order of preference:

* allreduce alpha/beta: ``benchmarks/results/allreduce.json`` (COMM-ALGO's benchmark) when it
  has (bytes, seconds) points for 2 ranks; else this module's own measurement
  (``mpiexec -n 2 python -m hpcsgd.perfmodel.calibrate``: ``MPI_Allreduce`` of float32
  buffers from 4 KiB to 32 MiB, median of repeats) stored in
  ``benchmarks/results/predict_calibration.json``;
* pack bandwidth: a timed float32 -> float16 copy (the cast the packer does);
* compute: ``benchmarks/results/scaling.json`` 1-rank phases (forward + backward per image,
  update) for each model.

The model's error on what was measured (allreduce cases, step times, the emulated
cluster) is computed by :mod:`hpcsgd.perfmodel.checks`
(``python -m hpcsgd.perfmodel.calibrate --report``).

The fit is least squares on relative error of ``T(n) = c_alpha(p) alpha + c_beta(p, n) beta``
with the algorithm's coefficients (ring at p = 2: 2 alpha + n beta).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from .costs import Level
from .model import Cluster, Device

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = RESULTS / "predict_calibration.json"

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


def points_from_allreduce_json(path: Path = RESULTS / "allreduce.json") -> tuple[list, int] | None:
    """((bytes, seconds) points, ranks) of the OSU-style ``MPI_Allreduce`` sweep in COMM-ALGO's
    ``benchmarks/allreduce.py`` output; None when the file is missing or has no sweep."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        pts = [(int(r["bytes"]), float(r["us"]) * 1e-6) for r in data["osu_allreduce_f32"]]
        ranks = int(data["ranks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pts, ranks) if len(pts) >= 2 else None


def measured_overlap(path: Path = RESULTS / "overlap.json", config: str | None = None) -> float | None:
    """Fraction of the allreduce hidden behind backward, from COMM-BASE's overlap benchmark.

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


def load_calibration(path: Path = CALIBRATION) -> dict:
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {}


def local_resnet50_compute(path: Path = RESULTS / "scaling.json") -> dict:
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
            "source": f"benchmarks/results/scaling.json resnet50 1 rank at {rec['image_size']} px x "
                      f"(224/{rec['image_size']})^2 (ASSUMPTION: FLOPs-proportional)"}


def local_cluster(calibration: dict | None = None, per_image_s: float = 0.01, fixed_s: float = 0.0,
                  backward_fraction: float = 2 / 3, compute_source: str = "benchmarks/results/scaling.json "
                                                                           "(1 rank)") -> Cluster:
    """This machine as a 'cluster': one node of 2 cores, MPICH shared memory between ranks.

    The emulated 2-host cluster (tests/cluster) is modelled as 2 nodes of 2 with the same
    level between nodes unless the calibration has an ``inter`` fit.
    """
    cal = load_calibration() if calibration is None else calibration
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


def model_errors(scaling: dict, calibration: dict | None = None) -> list[dict]:
    """Moved to :func:`hpcsgd.perfmodel.checks.model_errors` (kept for existing callers)."""
    from .checks import model_errors as impl

    return impl(scaling, calibration)


def measure() -> None:
    """Under mpiexec -n 2: measure allreduce and packing bandwidth, write predict_calibration.json.

    alpha/beta come from COMM-ALGO's interleaved sweep (benchmarks/results/allreduce.json) when it
    exists, else from this measurement; both fits are recorded.
    """
    from mpi4py import MPI

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
    other = points_from_allreduce_json()
    if other:
        fit = fit_alpha_beta(*other)
        out.update(fit_allreduce_json=fit, shm={"alpha": fit["alpha"], "beta": fit["beta"]},
                   source="benchmarks/results/allreduce.json OSU sweep (COMM-ALGO), fitted by "
                          "hpcsgd.perfmodel.calibrate")
    RESULTS.mkdir(parents=True, exist_ok=True)
    CALIBRATION.write_text(json.dumps(out, indent=1))
    keys = ("source", "shm", "fit_own", "fit_allreduce_json", "mem_bandwidth", "cast_bandwidth", "loadavg")
    print(json.dumps({k: out.get(k) for k in keys}, indent=1))




if __name__ == "__main__":
    import sys

    if "--report" in sys.argv:
        from .checks import report

        report()
    else:
        measure()
