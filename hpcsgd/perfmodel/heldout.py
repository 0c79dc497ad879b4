"""Held-out published runs: the model tested on runs it was not built from.

The three runs in :data:`hpcsgd.perfmodel.clusters.PUBLISHED` are in-sample: each
cluster's device compute there is derived from the same paper's small-scale run.
The runs here are predicted with clusters whose every parameter comes from a
public specification (data sheets, system descriptions) or a small published
benchmark (one GPU, one server), never from the run's own time, and nothing in
this module fits anything: no call of ``derive_per_image_s``, no baseline run.
``tests/test_perfmodel.py`` checks both, and that every entry cites its sources.

Source tags (Y1, Y2, G1, A7, ...) are listed in docs/perf.md ("Source tags");
further public sources are named in full where they are used. ``ASSUMPTION``
marks an engineering estimate no consulted source gives; ``DERIVED`` marks
arithmetic on sourced numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import RESNET50, Cluster, Device, Workload, predict
from .networks import EDR_X2_ABCI, ETH_50G, NVLINK2_V100, NVLINK_P100, OMNIPATH_100G, UPI_SHM

IMAGENET_TRAIN = 1_281_167

ALEXNET_BN = Workload(
    "alexnet-bn", params=60_965_224 + 2 * (96 + 256 + 384 + 384 + 256), param_arrays=8 + 8 + 2 * 5,
    dataset_images=IMAGENET_TRAIN,
    sources={"params": "AlexNet 60,965,224 (standard single-tower count; Y1 Table 6 rounds to 61M) + BN "
                       "gamma/beta after each of the 5 convolutions (Y1: LRN replaced by BN for 32K)",
             "param_arrays": "8 layers x (W, b) + 5 BN x (gamma, beta) = 26 (DERIVED)",
             "dataset_images": "ImageNet-1k train, 1,281,167 images"})

ALEXNET_TRAIN_FLOP = 3 * 1.5e9  # per image: Y1 Table 6 (1.5 GFLOP forward) x 3 for fwd + bwd (ASSUMPTION)

# -- devices -------------------------------------------------------------------------------

#: TensorFlow's published single-GPU benchmark (tensorflow/docs_src/performance/benchmarks.md,
#: "Details for NVIDIA DGX-1 (NVIDIA Tesla P100)", May 2017, synthetic data, 1 GPU):
#: ResNet-50 at batch 32: 195 images/s; at batch 64: 219 images/s.
_TF_P100_B32 = 32 / 195
_TF_P100_B64 = 64 / 219
_P100_PER_IMAGE = (_TF_P100_B64 - _TF_P100_B32) / 32
_P100_FIXED = _TF_P100_B32 - 32 * _P100_PER_IMAGE

P100_SXM2_TF = Device(
    "P100-SXM2 (TensorFlow benchmark)", per_image_s=_P100_PER_IMAGE, fixed_s=_P100_FIXED,
    mem_bandwidth=5.0e11,
    sources={"per_image_s": "DERIVED from the TensorFlow DGX-1 P100 benchmark, 1 GPU, synthetic data: "
                            "195 images/s at batch 32, 219 at batch 64 (slope between the two)",
             "fixed_s": "DERIVED from the same two points (intercept at batch 0)",
             "mem_bandwidth": "ASSUMPTION: ~70% of the 732 GB/s HBM2 data-sheet peak",
             "backward_fraction": "ASSUMPTION: backward ~2x forward"})

#: NVIDIA DeepLearningExamples, MxNet/Classification/RN50v1.5/README.md, "Training performance:
#: NVIDIA DGX-1 (8x V100 16GB)": 1 GPU, mixed precision, batch 192: 1,376 images/s.
V100_SXM2_MXNET = Device.from_throughput(
    "V100-SXM2 16GB (MXNet, mixed precision)", images_per_s=1376, ref_batch=192, fixed_s=0.005,
    mem_bandwidth=0.8 * 900e9,
    sources={"per_image_s": "NVIDIA DeepLearningExamples MXNet ResNet-50 v1.5 README: 1 V100 16GB, mixed "
                            "precision, batch 192, 1,376 images/s (v1.5 is ~5% slower than v1 per the same "
                            "README; not corrected). Container 20.12, later than the 2018/2019 runs",
             "fixed_s": "ASSUMPTION: ~160 layers x fwd/bwd x ~15 us launch overhead = 5 ms per iteration",
             "mem_bandwidth": "ASSUMPTION: 80% of the 900 GB/s HBM2 data-sheet peak",
             "backward_fraction": "ASSUMPTION: backward ~2x forward"})

_XEON_8160_PEAK = 24 * 2.1e9 * 2 * 16 * 2  # cores x base clock x 2 AVX-512 FMA units x 16 fp32 lanes x 2
_XEON_UTILISATION = 0.5
_XEON_FIXED = 0.010

XEON_8160_CAFFE = Device(
    "Xeon Platinum 8160, one socket (Intel Caffe, AlexNet-BN)",
    per_image_s=ALEXNET_TRAIN_FLOP / (_XEON_8160_PEAK * _XEON_UTILISATION), fixed_s=_XEON_FIXED,
    mem_bandwidth=0.7 * 6 * 21.33e9,
    sources={"per_image_s": "Intel ARK: 24 cores, 2.1 GHz base; Skylake-SP: 2 AVX-512 FMA units per core -> "
                            "3.23 TFLOP/s fp32 peak (DERIVED); 50% of it sustained by MKL-DNN including "
                            "AVX-512 down-clocking (ASSUMPTION); 4.5 GFLOP per AlexNet training image (Y1 "
                            "Table 6 x 3, ASSUMPTION)",
             "fixed_s": "ASSUMPTION: 10 ms per iteration of framework overhead",
             "mem_bandwidth": "Intel ARK: 6 DDR4-2666 channels = 128 GB/s per socket; 70% achieved "
                              "(ASSUMPTION)",
             "backward_fraction": "ASSUMPTION: backward ~2x forward"})

# -- clusters ----------------------------------------------------------------------------------

BIG_BASIN_SPEC = Cluster(
    "bigbasin-spec", "Big Basin from specs: 8 P100 (NVLink) per server, 50 GbE; P100 compute from "
                     "TensorFlow's 1-GPU benchmark",
    device=P100_SXM2_TF, devices_per_node=8, intra=NVLINK_P100, inter=ETH_50G, max_devices=352,
    communicator="leader", inter_algorithm="halving_doubling", wire_dtype="float32", overlap=0.5,
    sources={"devices_per_node": "G1: Big Basin, 8 P100 per server", "max_devices": "G1: up to 352 GPUs",
             "communicator": "G1: intra-server reduce, inter-server allreduce, broadcast (3 phases)",
             "inter_algorithm": "G1: recursive halving/doubling", "wire_dtype": "G1: float32",
             "overlap": "G1: overlapped with backprop layer by layer; fraction ASSUMPTION 0.5"})

STAMPEDE2_SKX = Cluster(
    "stampede2-skx", "TACC Stampede2 Skylake nodes: 2 Xeon Platinum 8160 per node, Omni-Path 100 Gbit/s",
    device=XEON_8160_CAFFE, devices_per_node=2, intra=UPI_SHM, inter=OMNIPATH_100G, max_devices=2 * 1736,
    workload=ALEXNET_BN,
    communicator="flat", inter_algorithm="halving_doubling", wire_dtype="float32", overlap=0.5,
    sources={"devices_per_node": "TACC Stampede2 user guide: 2 sockets per SKX node; one process per "
                                 "socket (ASSUMPTION: Y2's 2,048 CPUs = 1,024 nodes; Y1's '1024 CPUs' "
                                 "counts nodes)",
             "max_devices": "TACC Stampede2 user guide: 1,736 SKX nodes",
             "communicator": "ASSUMPTION: MLSL/Intel MPI allreduce of the packed gradients (Y1: Intel Caffe "
                             "with MLSL)",
             "inter_algorithm": "ASSUMPTION: Intel MPI large-message allreduce = Rabenseifner",
             "wire_dtype": "Y1: float32", "overlap": "ASSUMPTION: MLSL overlaps with backward; fraction 0.5"})

ABCI = Cluster(
    "abci", "AIST ABCI: 1,088 nodes x 4 V100 SXM2 (NVLink2), 2x InfiniBand EDR, 1:3 above the rack",
    device=V100_SXM2_MXNET, devices_per_node=4, intra=NVLINK2_V100, inter=EDR_X2_ABCI, max_devices=4352,
    communicator="hierarchical", inter_algorithm="ring", wire_dtype="float16", overlap=0.0,
    sources={"devices_per_node": "ABCI system description (news.mynavi.jp/article/abci-2): 4 V100 per node",
             "max_devices": "NVIDIA blog on Yamazaki et al.: 'over 4300 V100'; 1,088 nodes x 4 = 4,352",
             "communicator": "Mikami et al., arXiv 1811.05233 abstract: 2D-torus allreduce = reduce-scatter, "
                             "allreduce of shards, allgather (node as one dimension: ASSUMPTION); Yamazaki "
                             "et al.: algorithm UNCONFIRMED, same assumed",
             "wire_dtype": "ASSUMPTION: float16 gradients (both runs compute in mixed precision, A7 and the "
                           "NVIDIA blog on Yamazaki et al.)",
             "overlap": "ASSUMPTION: none stated; 0 (the table also shows overlap 1)"})

_SPEC = {c.name: c for c in (BIG_BASIN_SPEC, STAMPEDE2_SKX, ABCI)}
SPEC_CLUSTERS = tuple(_SPEC)


def spec_cluster(name: str) -> Cluster:
    """A cluster built only from public specifications and small benchmarks."""
    try:
        return _SPEC[name]
    except KeyError:
        raise ValueError(f"unknown spec cluster {name!r}; choose from {sorted(_SPEC)}") from None


# -- the held-out runs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HeldOutRun:
    """A published number the model's parameters were not taken for.

    ``phases`` are (epochs, global batch) pairs run one after the other (batch-size
    control); ``metric`` is ``time_to_train_s`` (seconds for all phases) or
    ``iteration_s`` (seconds per iteration of the first phase). ``sources`` names
    where the published number and the run's configuration come from.
    """

    key: str
    paper: str
    cluster: str
    devices: int
    phases: tuple[tuple[float, int], ...]
    metric: str
    published: float
    sources: dict
    workload: Workload = RESNET50

    def __post_init__(self) -> None:
        if self.metric not in ("time_to_train_s", "iteration_s"):
            raise ValueError(f"{self.key}: unknown metric {self.metric!r}")


HELDOUT = (
    HeldOutRun("you-alexnet", "You et al. 2018, AlexNet", "stampede2-skx", 2048, ((100, 32_768),),
               "time_to_train_s", 11 * 60,
               {"time": "Y2: 100-epoch AlexNet in 11 min on 2,048 Xeon Platinum 8160",
                "batch": "Y1 AlexNet table: batch 32768, 100 epochs, 11 min (Y1 counts 1024 CPUs)",
                "model": "Y1: AlexNet with BN after each convolution (AlexNet-BN) for 32K"},
               workload=ALEXNET_BN),
    HeldOutRun("goyal-8gpu", "Goyal et al. 2017, Fig. 7 text", "bigbasin-spec", 8, ((90, 256),),
               "iteration_s", 30.0 / (IMAGENET_TRAIN / 11_264) / 1.12,
               {"iteration": "G1: ~30 s per epoch on 352 GPUs (kn = 11,264) and +12% iteration time from "
                             "kn = 256 (8 GPUs) to 11k -> 0.2355 s (DERIVED)"}),
    HeldOutRun("goyal-256gpu", "Goyal et al. 2017, 1 hour", "bigbasin-spec", 256, ((90, 8_192),),
               "iteration_s", 3600 / math.ceil(90 * IMAGENET_TRAIN / 8_192),
               {"iteration": "G1: 90 epochs at kn = 8k in 1 hour on 256 GPUs -> 3600 s / 14,076 iterations "
                             "(DERIVED)"}),
    HeldOutRun("goyal-352gpu", "Goyal et al. 2017, Fig. 7 text", "bigbasin-spec", 352, ((90, 11_264),),
               "iteration_s", 30.0 / (IMAGENET_TRAIN / 11_264),
               {"iteration": "G1: ~30 s per epoch on 352 GPUs at kn = 11,264 -> 113.7 iterations (DERIVED)"}),
    HeldOutRun("mikami", "Mikami et al. 2018 (v1)", "abci", 2176, ((5, 34_816), (85, 69_632)),
               "time_to_train_s", 224.0,
               {"time": "A7 and arXiv 1811.05233v1: 224 s on 2,176 V100 (ABCI), 75.03%",
                "batch": "A7: batch-size control 34K -> 68K, the first 5 epochs at the small "
                         "batch (16 and 32 per GPU); the exact switch epoch is UNCONFIRMED",
                "epochs": "90 (the convention of every compared run; UNCONFIRMED for Mikami)"}),
    HeldOutRun("yamazaki", "Yamazaki et al. 2019", "abci", 2048, ((90, 81_920),), "iteration_s",
               81_920 / 1.73e6,
               {"iteration": "arXiv 1903.12650 abstract: >1.73M images/s on 2,048 V100 (ABCI); batch 81,920 "
                             "(NVIDIA blog on the record) -> 47.4 ms per iteration (DERIVED)"}),
)


def predict_run(run: HeldOutRun, overlap: float | None = None) -> dict:
    """The model's number for ``run`` (computed, never stored) and its error against the paper."""
    cluster = spec_cluster(run.cluster)
    preds = [predict(cluster, run.devices, batch, epochs, workload=run.workload, overlap=overlap)
             for epochs, batch in run.phases]
    if run.metric == "time_to_train_s":
        value = sum(p.time_to_train_s for p in preds)
    else:
        value = preds[0].iteration_s
    first = preds[0]
    return {"key": run.key, "paper": run.paper, "cluster": run.cluster, "devices": run.devices,
            "global_batch": [b for _, b in run.phases], "metric": run.metric, "published": run.published,
            "predicted": value, "error": value / run.published - 1,
            "compute_s": first.compute_s, "exposed_comm_s": first.exposed_comm_s,
            "latency_s": first.allreduce.latency, "bandwidth_s": first.allreduce.bandwidth,
            "iteration_s": first.iteration_s, "sources": dict(run.sources)}


def heldout_table(overlap: float | None = None) -> list[dict]:
    """Every held-out run predicted now, with its error; plus the error at overlap 0 and 1."""
    rows = []
    for run in HELDOUT:
        row = predict_run(run, overlap)
        lo, hi = (predict_run(run, ov)["error"] for ov in (0.0, 1.0))
        row["error_range_overlap"] = (min(lo, hi), max(lo, hi))
        rows.append(row)
    return rows


def spread(rows: list[dict]) -> dict:
    """Smallest, largest and median absolute error of a table."""
    errs = sorted(r["error"] for r in rows)
    absolute = sorted(abs(e) for e in errs)
    n = len(absolute)
    median = absolute[n // 2] if n % 2 else 0.5 * (absolute[n // 2 - 1] + absolute[n // 2])
    return {"min": errs[0], "max": errs[-1], "median_abs": median, "n": n}

