"""Communicators: how ranks average gradients and move arrays (ChainerMN-compatible).

``create_communicator(name)`` builds one; every class implements
:class:`~hpcsgd.comm.base.CommunicatorBase`. The registry :data:`COMMUNICATORS`
declares, per name, the class and its capabilities (devices, where overlap and
double buffering are supported, wire formats); :func:`check_combination` and the
capability table (``python -m hpcsgd.comm``, copied into docs/comm_algorithms.md)
are generated from it, so they cannot drift apart. One algorithm per module.

Classes are imported only when requested, so ``import hpcsgd.comm`` does not
initialise MPI (the configuration check runs before MPI starts).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from hpcsgd.errors import ConfigError


@dataclass(frozen=True)
class Registration:
    """One communicator: where its class lives and what it supports.

    ``devices``: where ``multi_node_mean_grad`` runs (``'cpu'``: NumPy gradients,
    ``'gpu'``: CuPy). ``overlap_devices``: where overlap during backward and double
    buffering are supported (validated); a subset of ``devices``.
    """

    module: str
    cls: str
    algorithm: str
    devices: tuple[str, ...]
    overlap_devices: tuple[str, ...]
    wire: str

    def runs_on(self, device: str) -> bool:
        return device in self.devices


#: communicator name -> registration (``hierarchical`` is the default)
COMMUNICATORS: dict[str, Registration] = {
    "naive": Registration(
        "hpcsgd.comm.naive", "NaiveCommunicator",
        "one MPI Allreduce per parameter (ChainerMN's CPU baseline)",
        ("cpu",), ("cpu",), "float32, float16, bfloat16 (16-bit summed in float32)"),
    "flat": Registration(
        "hpcsgd.comm.flat", "FlatCommunicator",
        "one MPI Allreduce of the packed buffer, in buckets",
        ("cpu",), ("cpu",), "float32, float16, bfloat16"),
    "hierarchical": Registration(
        "hpcsgd.comm.hierarchical", "HierarchicalCommunicator",
        "reduce-scatter in the node (shared memory on CPU, NCCL on GPU), allreduce of each shard "
        "between nodes, allgather in the node (the default)",
        ("cpu", "gpu"), ("cpu",), "intra float32; inter float16 (float32 accumulation) or float32"),
    "nccl": Registration(
        "hpcsgd.comm.nccl", "NcclCommunicator",
        "one NCCL allreduce of the packed buffer per bucket (ChainerMN's pure_nccl)",
        ("gpu",), (), "float32, float16, bfloat16"),
    "dummy": Registration(
        "hpcsgd.comm.dummy", "DummyCommunicator",
        "pack and unpack only, no communication (benchmarks only: the result is not the mean)",
        ("cpu", "gpu"), ("cpu",), "any"),
}

#: devices on which the registered paths have actually run (tests and benchmarks); the GPU
#: path is written against the same interfaces but no GPU has run it yet (docs/gpu.md)
VALIDATED_DEVICES = ("cpu",)

_LAZY = {
    "CommunicatorBase": "hpcsgd.comm.base",
    "MpiCommunicatorBase": "hpcsgd.comm.mpi_base",
}


def communicator_class(name: str) -> type:
    """The class registered as ``name`` (imports its module); ValueError lists the names."""
    if name not in COMMUNICATORS:
        raise ConfigError(f"unknown communicator {name!r}; choose one of {', '.join(COMMUNICATORS)}")
    reg = COMMUNICATORS[name]
    try:
        mod = importlib.import_module(reg.module)
    except ModuleNotFoundError as e:
        if e.name != reg.module:
            raise
        raise ValueError(f"communicator {name!r} is registered but {reg.module} is not installed") from e
    return getattr(mod, reg.cls)


def registration_of(comm) -> tuple[str, Registration] | None:
    """(name, registration) of a communicator instance's class or nearest registered base, else None."""
    for klass in type(comm).__mro__:
        for name, reg in COMMUNICATORS.items():
            if klass.__module__ == reg.module and klass.__name__ == reg.cls:
                return name, reg
    return None


def check_combination(communicator, *, overlap: bool = False, double_buffering: bool = False,
                      gpu: bool | None = False) -> None:
    """Raise :class:`~hpcsgd.errors.ConfigError` (a ValueError) naming the keys of an unsupported combination.

    ``communicator``: a registered name, or a communicator instance (its registered
    class, else: overlap needs a ``bucket_algorithm``, double buffering a
    ``multi_node_mean_grad_async``). ``gpu=None``: the device is not known yet (only
    what fails on every device is rejected). Purely local: no MPI call, no import of MPI.
    """
    if overlap and double_buffering:
        raise ConfigError("overlap: true and double_buffering: true are alternatives; set one of them")
    device = None if gpu is None else ("gpu" if gpu else "cpu")
    if isinstance(communicator, str):
        if communicator not in COMMUNICATORS:
            raise ConfigError(f"communicator: {communicator!r} is unknown; choose one of "
                              f"{', '.join(COMMUNICATORS)}")
        name, reg = communicator, COMMUNICATORS[communicator]
    else:
        found = registration_of(communicator)
        if found is None:  # a ChainerMN or user communicator: judge by its public methods
            from hpcsgd.comm.base import CommunicatorBase  # no MPI import

            name = type(communicator).__name__
            method = getattr(type(communicator), "bucket_algorithm", None)
            if overlap and (not callable(method) or method is CommunicatorBase.bucket_algorithm):
                raise ConfigError(f"overlap: true is not supported by communicator: {name} (it has no "
                                  f"bucket_algorithm; use an hpcsgd communicator)")
            if double_buffering and not callable(getattr(communicator, "multi_node_mean_grad_async", None)):
                raise ConfigError(f"double_buffering: true is not supported by communicator: {name} (it has "
                                  f"no multi_node_mean_grad_async; use an hpcsgd communicator)")
            return
        name, reg = found
    if device is None:
        for key, on in (("overlap", overlap), ("double_buffering", double_buffering)):
            if on and not reg.overlap_devices:
                raise ConfigError(f"{key}: true is not supported by communicator: {name} (on any device)")
        return
    if not reg.runs_on(device):
        where = [n for n, r in COMMUNICATORS.items() if r.runs_on(device)]
        raise ConfigError(f"communicator: {name} does not run with gpu: {str(gpu).lower()} "
                          f"(it supports {'/'.join(reg.devices)}; for {device} use {', '.join(where)})")
    for key, on in (("overlap", overlap), ("double_buffering", double_buffering)):
        if on and device not in reg.overlap_devices:
            what = "validated on CPU only so far" if gpu else "not available"
            ok = [n for n, r in COMMUNICATORS.items() if device in r.overlap_devices]
            raise ConfigError(f"{key}: true is not supported by communicator: {name} with gpu: "
                              f"{str(gpu).lower()} ({what}; supported: {', '.join(ok) or 'none'})")


def capability_table() -> str:
    """The Markdown capability table of every registered communicator (docs/comm_algorithms.md)."""
    def mark(ok: bool, device: str) -> str:
        if not ok:
            return "no"
        return "yes" if device in VALIDATED_DEVICES else "written, not yet run"

    rows = ["| name | gradient mean (`multi_node_mean_grad`) | CPU | GPU | overlap / double buffering "
            "| wire dtypes |", "|---|---|---|---|---|---|"]
    for name, r in COMMUNICATORS.items():
        ov = "/".join(d.upper() for d in r.overlap_devices) or "no"
        rows.append(f"| `{name}` | {r.algorithm} | {mark(r.runs_on('cpu'), 'cpu')} "
                    f"| {mark(r.runs_on('gpu'), 'gpu')} | {ov} | {r.wire} |")
    return "\n".join(rows) + "\n"


def create_communicator(communicator_name: str = "hierarchical", mpi_comm=None,
                        allreduce_grad_dtype=None, batched_copy: bool = True, *,
                        name: str | None = None, **config: Any):
    """Create a communicator over ``mpi_comm`` (``MPI.COMM_WORLD`` when None). Collective.

    Args:
        communicator_name: one of ``COMMUNICATORS`` (see ``python -m hpcsgd.comm``).
            ``name=`` is accepted as the hpcsgd spelling of the same argument.
        mpi_comm: an mpi4py communicator; the communicator works on a duplicate.
        allreduce_grad_dtype: wire dtype of the gradients ('float16', 'float32',
            numpy dtypes accepted); None lets the algorithm choose its measured default.
        batched_copy: pack/unpack all gradients in one fused pass (ChainerMN's option).
        **config: further config options, e.g. ``intra_dtype``, ``inter_dtype``,
            ``bucket_bytes``, ``check_finite``, ``half_scaling`` (float16 wire: 'chunk', a
            power-of-two scale per message, on GPU one per bucket common to all ranks, or
            'predivide'); unknown names raise ValueError.
    """
    if name is not None:
        if communicator_name not in ("hierarchical", name):
            raise ValueError(f"create_communicator: got both communicator_name={communicator_name!r} "
                             f"and name={name!r}")
        communicator_name = name
    cls = communicator_class(communicator_name)
    if allreduce_grad_dtype is not None:
        config["allreduce_grad_dtype"] = allreduce_grad_dtype
    config.setdefault("batched_copy", batched_copy)
    return cls(mpi_comm=mpi_comm, **config)


def __getattr__(attr: str):
    if attr in _LAZY:
        return getattr(importlib.import_module(_LAZY[attr]), attr)
    raise AttributeError(f"module 'hpcsgd.comm' has no attribute {attr!r}")


__all__ = ["COMMUNICATORS", "Registration", "capability_table", "check_combination", "communicator_class",
           "create_communicator", "registration_of", *_LAZY]
