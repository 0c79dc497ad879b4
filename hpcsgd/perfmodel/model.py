"""Iteration time and time-to-train of synchronous data-parallel SGD.

    iteration = compute(b) + update + straggler(P) + exposed allreduce + exposed data

* ``compute(b)`` = forward + backward of ``b`` images on one device:
  ``fixed_s + b * per_image_s``. ``fixed_s`` (kernel launches, per-layer
  overheads) makes small per-device batches less efficient.
* ``update``: the optimizer step, memory bound (``update_bytes_per_param`` per
  parameter through device memory).
* exposed allreduce: pack + allreduce + unpack (see :mod:`costs`) minus the
  part hidden behind backward: ``hidden = min(overlap * comm, backward)``.
  ``overlap`` is the fraction of the communication that runs concurrently with
  backward (0 = ChainerMN-style after-backward allreduce; measured by
  ``benchmarks/overlap.py`` for hpcsgd).
* communicator names are the runtime's (``naive``, ``flat``, ``hierarchical``,
  ``nccl``) plus ``leader`` (reduce to a node leader, leaders allreduce,
  broadcast); see :func:`hpcsgd.perfmodel.costs.allreduce_cost`.
* straggler: synchronous SGD waits for the slowest of P devices; with
  per-iteration compute jitter of relative std ``jitter_cv`` the expected
  maximum of P normal draws adds ``cv * compute * sqrt(2 ln P)``.
* exposed data: with a pipelined loader, ``max(0, b_node / decode_rate - rest)``.

Weak-scaling efficiency is the single-device iteration (same per-device batch,
no communication, no straggler) divided by the iteration at P devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

from .costs import CommCost, Level, allreduce_cost, dtype_bytes, pack_cost


@dataclass(frozen=True)
class Workload:
    """A model and data set: what is computed and what is communicated."""

    name: str
    params: int                 # trainable scalars
    param_arrays: int           # number of parameter arrays (per-array overheads)
    dataset_images: int         # images per epoch
    sources: Mapping[str, str] = field(default_factory=dict)


RESNET50 = Workload(
    "resnet50", params=25_557_032, param_arrays=161, dataset_images=1_281_167,
    sources={"params": "standard ResNet-50 count (torchvision / Chainer ResNet50Layers); G1 and Y1 "
                       "Table 6 round it to 25M",
             "param_arrays": "53 conv W + 53 BN (gamma, beta) + fc W, b = 161 (derived from the "
                             "architecture)",
             "dataset_images": "ImageNet-1k train, 1,281,167 images"})


@dataclass(frozen=True)
class Device:
    """Per-device compute of one training step (forward + backward + update)."""

    name: str
    per_image_s: float          # seconds per image (forward + backward), batch-proportional part
    fixed_s: float = 0.0        # seconds per iteration independent of the batch
    mem_bandwidth: float = 5e11  # bytes/s for pack/unpack/update
    backward_fraction: float = 2 / 3  # share of compute spent in backward
    cast_bandwidth: float | None = None  # bytes/s of the float32 -> 16-bit packing cast (None: mem_bandwidth)
    sources: Mapping[str, str] = field(default_factory=dict)

    def compute_s(self, batch: int) -> float:
        """Forward + backward seconds for ``batch`` images."""
        return self.fixed_s + batch * self.per_image_s

    @classmethod
    def from_throughput(cls, name: str, images_per_s: float, ref_batch: int, fixed_s: float = 0.0,
                        **kw) -> Device:
        """A device whose forward+backward runs ``images_per_s`` at batch ``ref_batch``."""
        step = ref_batch / images_per_s
        if step <= fixed_s:
            raise ValueError(f"{name}: fixed_s {fixed_s} >= step time {step} at batch {ref_batch}")
        return cls(name, per_image_s=(step - fixed_s) / ref_batch, fixed_s=fixed_s, **kw)


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical devices joined by an intra-node and an inter-node level."""

    name: str
    description: str
    device: Device
    devices_per_node: int
    intra: Level | None
    inter: Level
    max_devices: int
    communicator: str = "hierarchical"   # a name of costs.COMMUNICATORS: what the published run used
    inter_algorithm: str = "ring"
    wire_dtype: str = "float32"
    overlap: float = 0.0
    batched_pack: bool = True
    per_array_s: float = 5e-6           # launch/dispatch overhead per array when packing unbatched
    update_bytes_per_param: float = 16.0  # read param, grad, state; write param, state (fp32)
    jitter_cv: float = 0.0
    data_images_per_s_per_node: float | None = None
    workload: Workload | None = None    # the model the device's compute figures are for (None: any)
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Prediction:
    """Breakdown of one iteration (seconds) and the time-to-train."""

    cluster: str
    workload: str
    devices: int
    nodes: int
    global_batch: int
    per_device_batch: int
    communicator: str
    inter_algorithm: str
    wire_dtype: str
    overlap: float
    forward_s: float
    backward_s: float
    update_s: float
    straggler_s: float
    pack_s: float
    allreduce: CommCost
    exposed_comm_s: float
    exposed_data_s: float
    iteration_s: float
    single_device_iteration_s: float
    iterations: int
    epochs: float
    extrapolated: bool = False  # more devices than the real machine has

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def comm_s(self) -> float:
        """Pack + allreduce + unpack, before overlap."""
        return self.pack_s + self.allreduce.total

    @property
    def time_to_train_s(self) -> float:
        return self.iterations * self.iteration_s

    @property
    def efficiency(self) -> float:
        return self.single_device_iteration_s / self.iteration_s

    @property
    def images_per_s(self) -> float:
        return self.global_batch / self.iteration_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d["allreduce"] = self.allreduce.as_dict()
        d.update(compute_s=self.compute_s, comm_s=self.comm_s, time_to_train_s=self.time_to_train_s,
                 efficiency=self.efficiency, images_per_s=self.images_per_s)
        return d


def predict(cluster: Cluster, devices: int, global_batch: int, epochs: float = 90.0,
            workload: Workload | None = None, communicator: str | None = None,
            inter_algorithm: str | None = None, wire_dtype: str | None = None,
            overlap: float | None = None, jitter_cv: float | None = None,
            grad_dtype: str = "float32") -> Prediction:
    """Predict one iteration and the time-to-train of ``workload`` on ``devices`` of ``cluster``.

    Arguments left as None take the cluster's published setting; ``workload`` defaults to
    the cluster's (ResNet-50 when it has none). A cluster whose device compute was taken for
    one model refuses another: its per-image time would be meaningless.
    """
    workload, k, nodes, b = _layout(cluster, workload, devices, global_batch)
    comm_name = communicator or cluster.communicator
    if comm_name == "nccl" and inter_algorithm not in (None, "ring"):
        raise ValueError(f"communicator 'nccl' is one ring over all devices; inter_algorithm "
                         f"{inter_algorithm!r} does not apply")
    algo = "ring" if comm_name == "nccl" else (inter_algorithm or cluster.inter_algorithm)
    wire = wire_dtype or cluster.wire_dtype
    ov = cluster.overlap if overlap is None else overlap
    if not 0.0 <= ov <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {ov}")
    cv = cluster.jitter_cv if jitter_cv is None else jitter_cv
    dev = cluster.device

    compute = dev.compute_s(b)
    backward = compute * dev.backward_fraction
    forward = compute - backward
    update = workload.params * cluster.update_bytes_per_param / dev.mem_bandwidth
    straggler = cv * compute * math.sqrt(2 * math.log(devices)) if devices > 1 else 0.0

    ar, pack = _comm(cluster, workload, nodes, k, comm_name, algo, wire, grad_dtype)
    comm = pack + ar.total
    exposed_comm = comm - min(ov * comm, backward)
    iteration = compute + update + straggler + exposed_comm
    data = 0.0
    if cluster.data_images_per_s_per_node:
        data = max(0.0, b * k / cluster.data_images_per_s_per_node - iteration)
    iteration += data
    iterations = math.ceil(epochs * workload.dataset_images / global_batch)
    return Prediction(
        cluster=cluster.name, workload=workload.name, devices=devices, nodes=nodes, global_batch=global_batch,
        per_device_batch=b, communicator=comm_name, inter_algorithm=algo, wire_dtype=wire, overlap=ov,
        forward_s=forward, backward_s=backward, update_s=update, straggler_s=straggler, pack_s=pack,
        allreduce=ar, exposed_comm_s=exposed_comm, exposed_data_s=data, iteration_s=iteration,
        single_device_iteration_s=compute + update, iterations=iterations, epochs=epochs,
        extrapolated=devices > cluster.max_devices)


def _layout(cluster: Cluster, workload: Workload | None, devices: int,
            global_batch: int) -> tuple[Workload, int, int, int]:
    """``(workload, devices per node, nodes, per-device batch)``; a ValueError names what does not fit."""
    wl = workload or cluster.workload or RESNET50
    if cluster.workload is not None and wl.name != cluster.workload.name:
        raise ValueError(f"cluster {cluster.name!r}: its device compute is for {cluster.workload.name}, "
                         f"not {wl.name}")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if global_batch % devices:
        raise ValueError(f"global batch {global_batch} is not divisible by {devices} devices")
    k = min(cluster.devices_per_node, devices)
    if devices % k:
        raise ValueError(f"{devices} devices do not fill whole nodes of {k}")
    return wl, k, devices // k, global_batch // devices


def _comm(cluster: Cluster, workload: Workload, nodes: int, k: int, comm_name: str, algo: str, wire: str,
          grad_dtype: str) -> tuple[CommCost, float]:
    """``(allreduce cost, pack + unpack seconds)`` of one step's gradients; zero on one device."""
    if nodes * k == 1:
        return CommCost(), 0.0
    dev = cluster.device
    nbytes = workload.params * dtype_bytes(wire)
    ar = allreduce_cost(comm_name, nbytes, nodes, k, cluster.intra, cluster.inter, algo,
                        workload.param_arrays)
    batched = cluster.batched_pack and comm_name != "naive"
    casting = dtype_bytes(wire) != dtype_bytes(grad_dtype) and dev.cast_bandwidth
    pack = pack_cost(workload.params, dtype_bytes(grad_dtype), dtype_bytes(wire),
                     dev.cast_bandwidth if casting else dev.mem_bandwidth,
                     workload.param_arrays, cluster.per_array_s, batched)
    return ar, pack


def derive_per_image_s(cluster: Cluster, devices: int, global_batch: int, iteration_s: float,
                       workload: Workload = RESNET50, **kw) -> float:
    """Invert the model: the ``per_image_s`` that makes ``predict`` give ``iteration_s``.

    Used to turn a published small-scale run (Goyal's 8-GPU server, You's 16
    KNL) into a per-device compute figure without counting that run's own
    communication as compute. Bisection; the iteration time grows with
    per_image_s.
    """
    from dataclasses import replace

    def iteration(per_image: float) -> float:
        dev = replace(cluster.device, per_image_s=per_image)
        return predict(replace(cluster, device=dev), devices, global_batch, 1.0, workload, **kw).iteration_s

    lo, hi = 0.0, iteration_s
    if iteration(lo) > iteration_s:
        raise ValueError(f"{cluster.name}: communication alone exceeds the published {iteration_s} s")
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if iteration(mid) < iteration_s:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
