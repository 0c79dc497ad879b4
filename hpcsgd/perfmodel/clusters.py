"""Published clusters and runs, every number with its source.

Source tags (A1, A3, G1, Y1, ...) are listed with their papers and addresses in
docs/perf.md ("Source tags").
``ASSUMPTION`` marks a number no consulted source gives (a vendor data-sheet
value or an engineering estimate); ``DERIVED`` marks arithmetic on sourced
numbers. The model is meant to be read together with these tags: change an
assumption with ``dataclasses.replace`` or the CLI flags and see what moves.

Per-device compute is not taken from a benchmark site: it is derived from each
paper's own small-scale run by inverting the model (``derive_per_image_s``),
so the small run's communication is not double-counted as compute:

* P100 (SXM2, Caffe2): Goyal's 8-GPU server. G1: an epoch takes ~30 s on 352
  GPUs (kn = 11,264, 113.7 iterations/epoch -> 0.264 s/iteration) and the
  time per iteration rises 12% from kn = 256 to 11k -> 0.2355 s/iteration at
  8 GPUs x 32 images (DERIVED).
* P100 (PCIe, MN-1): the SXM2 figure scaled by the FP64 peak ratio 5.3/4.7
  TFLOPS (4.7 from A3; 5.3 SXM2 data sheet, ASSUMPTION) and by the assumption
  that Chainer 3 on a P100 computes as fast as Caffe2 (ASSUMPTION).
* KNL 7250 (Intel Caffe): You's 16-KNL run, batch 256 (16 per KNL), 90 epochs in
  45 h (Y1 Table 9) -> 162,000 s / 450,411 iterations = 0.3597 s/iteration (DERIVED).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

from .heldout import SPEC_CLUSTERS, spec_cluster
from .model import RESNET50, Cluster, Device, derive_per_image_s
from .networks import ETH_50G, FDR_X2_THIN_TREE, NVLINK_P100, OMNIPATH_100G, PCIE3_P100

ASSUMPTION = "ASSUMPTION"

# -- devices (per_image_s filled in by derivation below) -------------------------

_P100_SXM2 = Device(
    "P100-SXM2 (Caffe2)", per_image_s=7e-3, fixed_s=0.010, mem_bandwidth=5.0e11,
    sources={"per_image_s": "DERIVED from G1 8-GPU iteration 0.2355 s (see module doc)",
             "fixed_s": "ASSUMPTION: ~160 layers x fwd/bwd x ~30 us launch/framework overhead",
             "mem_bandwidth": "ASSUMPTION: ~70% of the 732 GB/s HBM2 data-sheet peak",
             "backward_fraction": "ASSUMPTION: backward ~2x forward (common rule of thumb)"})

_KNL_7250 = Device(
    "Xeon Phi 7250 KNL (Intel Caffe)", per_image_s=2e-2, fixed_s=0.020, mem_bandwidth=3.0e11,
    sources={"per_image_s": "DERIVED from Y1 Table 9: 16 KNL, batch 256, 90 epochs, 45 h",
             "fixed_s": "ASSUMPTION: per-iteration framework overhead on a 68-core KNL",
             "mem_bandwidth": "ASSUMPTION: MCDRAM STREAM-class bandwidth ~300 GB/s",
             "backward_fraction": "ASSUMPTION: backward ~2x forward"})

# -- clusters ----------------------------------------------------------------------

BIG_BASIN = Cluster(
    "bigbasin", "Facebook Big Basin: 8 P100 (NVLink) per server, 50 Gbit Ethernet (Goyal et al., G1)",
    device=_P100_SXM2, devices_per_node=8, intra=NVLINK_P100, inter=ETH_50G, max_devices=352,
    communicator="leader", inter_algorithm="halving_doubling", wire_dtype="float32", overlap=0.5,
    sources={"devices_per_node": "G1: Big Basin, 8 P100 per server", "max_devices": "G1: up to 352 GPUs",
             "communicator": "G1: intra-server reduce (NCCL), inter-server allreduce, broadcast (3 phases)",
             "inter_algorithm": "G1: recursive halving/doubling, 3x faster than ring on 32 servers",
             "wire_dtype": "G1: float32 (no reduced-precision communication mentioned)",
             "overlap": "G1: allreduces overlapped with backprop layer by layer; fraction ASSUMPTION 0.5 "
                        "(predictions stay within +-20% for any value in [0, 1])"})

MN1 = Cluster(
    "mn1", "PFN MN-1: 128 nodes x 8 P100 (PCIe), 2x InfiniBand FDR, thin tree (Akiba et al., A3)",
    device=_P100_SXM2, devices_per_node=8, intra=PCIE3_P100, inter=FDR_X2_THIN_TREE, max_devices=1024,
    communicator="nccl", inter_algorithm="ring", wire_dtype="float16", overlap=0.0,
    sources={"devices_per_node": "A3: 128 nodes x 8 P100", "max_devices": "A3: 1024 GPUs",
             "communicator": "A3: the 15-min run used the ring all-reduce (NCCL 2.0.5 per A1; pure ring "
                             "over all GPUs is UNCONFIRMED)",
             "wire_dtype": "A1: FP16 gradient communication",
             "overlap": "ASSUMPTION: no overlap (ChainerMN double buffering came with v1.2/1.3, A4)"})

STAMPEDE2_KNL = Cluster(
    "stampede2", "TACC Stampede2: Xeon Phi 7250 (KNL) nodes, Intel Omni-Path (You et al., Y1/Y2)",
    device=_KNL_7250, devices_per_node=1, intra=None, inter=OMNIPATH_100G, max_devices=4200,
    communicator="flat", inter_algorithm="halving_doubling", wire_dtype="float32", overlap=0.5,
    sources={"devices_per_node": "ASSUMPTION: one Caffe process per KNL node",
             "communicator": "ASSUMPTION: MLSL/Intel MPI allreduce of the packed gradients (one device per "
                             "node, so flat = leader = hierarchical here)",
             "max_devices": "ASSUMPTION: Stampede2 has 4,200 KNL nodes (TACC); Y2 uses 2,048",
             "inter_algorithm": "ASSUMPTION: MLSL/Intel MPI large-message allreduce = Rabenseifner",
             "wire_dtype": "Y1: float32", "overlap": "ASSUMPTION: Intel Caffe/MLSL overlaps allreduce "
                                                   "with backward; fraction 0.5"})

P100_PCIE_OVER_SXM2 = 5.3 / 4.7  # seconds ratio: A3 (4.7 TFLOPS FP64) vs SXM2 data sheet (ASSUMPTION)


@dataclass(frozen=True)
class BaselineRun:
    """A published small-scale run used to derive per-device compute."""

    devices: int
    global_batch: int
    iteration_s: float
    source: str


GOYAL_8GPU = BaselineRun(8, 256, 30.0 / (1_281_167 / 11_264) / 1.12,
                         "G1: ~30 s/epoch at 352 GPUs, +12% iteration time from kn=256 to 11k (DERIVED)")
YOU_16KNL = BaselineRun(16, 256, 45 * 3600 / -(-90 * 1_281_167 // 256),
                        "Y1 Table 9: batch 256, 16 KNL, 90 epochs, 45 h (DERIVED)")


@cache
def get_cluster(name: str) -> Cluster:
    """A published cluster, with its device compute derived from the published baseline run.

    ``local`` (this machine) is built from measurements: use
    :func:`hpcsgd.perfmodel.calibrate.measured_local_cluster` with the results directory.
    """
    name = name.lower()
    if name == "bigbasin":
        per_image = derive_per_image_s(BIG_BASIN, GOYAL_8GPU.devices, GOYAL_8GPU.global_batch,
                                       GOYAL_8GPU.iteration_s)
        return replace(BIG_BASIN, device=replace(BIG_BASIN.device, per_image_s=per_image))
    if name == "mn1":
        p100 = get_cluster("bigbasin").device
        pcie = replace(p100, name="P100-PCIe (Chainer, scaled from Caffe2 SXM2)",
                       per_image_s=p100.per_image_s * P100_PCIE_OVER_SXM2,
                       sources=dict(p100.sources, per_image_s="DERIVED: Goyal's P100 x 5.3/4.7 (A3 + data "
                                                               "sheet); Chainer = Caffe2 speed ASSUMPTION"))
        return replace(MN1, device=pcie)
    if name == "stampede2":
        per_image = derive_per_image_s(STAMPEDE2_KNL, YOU_16KNL.devices, YOU_16KNL.global_batch,
                                       YOU_16KNL.iteration_s)
        return replace(STAMPEDE2_KNL, device=replace(STAMPEDE2_KNL.device, per_image_s=per_image))
    if name in SPEC_CLUSTERS:
        return spec_cluster(name)
    if name == "local":
        raise ValueError("cluster 'local' is built from this machine's measurements: pass the results "
                         "directory (hpcsgd predict --cluster local --results DIR)")
    raise ValueError(f"unknown cluster {name!r}; choose from {CLUSTER_NAMES}")
CLUSTER_NAMES = ("mn1", "bigbasin", "stampede2", *SPEC_CLUSTERS, "local")


@dataclass(frozen=True)
class PublishedRun:
    """A published time-to-train whose sources the model's parameters were taken for (in-sample)."""

    key: str
    paper: str
    cluster: str
    devices: int
    global_batch: int
    epochs: float
    seconds: float
    source: str
    efficiency: float | None = None
    efficiency_baseline_devices: int = 1


PUBLISHED = (
    PublishedRun("akiba", "Akiba et al. 2017", "mn1", 1024, 32_768, 90, 15 * 60,
                 "A8: 15 min on 1024 P100, batch 32k, 90 epochs; 80% efficiency per Mikami (A7)",
                 efficiency=0.80,
                 efficiency_baseline_devices=1),
    PublishedRun("goyal", "Goyal et al. 2017", "bigbasin", 256, 8_192, 90, 60 * 60,
                 "G1: 1 hour on 256 P100, batch 8k, 90 epochs; ~90% efficiency from 8 GPUs", efficiency=0.90,
                 efficiency_baseline_devices=8),
    PublishedRun("you", "You et al. 2018", "stampede2", 2048, 32_768, 90, 20 * 60,
                 "Y1 Table 9 / Y2: 20 min on 2048 KNL, batch 32k, 90 epochs"),
)

WORKLOAD = RESNET50
