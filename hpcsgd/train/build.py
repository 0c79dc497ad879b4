"""Build a :class:`~hpcsgd.train.loop.Run` from a resolved config: everything before the first step.

Order of events on every rank (each step's seeds and collectives in the same
order on every rank, and the same order as every earlier version of the
trainer, so runs stay bitwise reproducible):

1. datasets (local I/O: a bad path or option fails before any collective);
2. communicator (collective) and topology; tracer, threads, kernels, device;
3. seeds (Python and NumPy: ``seed + rank``), output directory and log;
4. loaders (train, validation), model, loss, recipe, multi-node optimizer, and the
   gradient noise-scale tracker (:mod:`~hpcsgd.train.noise_scale`; local, no RNG).

Resuming from a checkpoint is the Run's own :meth:`~hpcsgd.train.loop.Run.resume`.
"""

from __future__ import annotations

import math
import os
import random

import chainer
import numpy as np

import hpcsgd
from hpcsgd.data import Loader, build_dataset
from hpcsgd.errors import ConfigError
from hpcsgd.kernels.threads import set_threads
from hpcsgd.losses import make_loss
from hpcsgd.models import build_model
from hpcsgd.runtime.trace import get_tracer
from hpcsgd.schedules import make_recipe
from hpcsgd.train import noise_scale
from hpcsgd.train.metrics import JsonlLog


def build_run(cfg: dict, out: str, resume: bool = False, timeline: str | None = None,
              timeline_iters: range | None = None):
    """Everything a run needs, set up on this rank (collective: creates the communicator).

    ``resume`` only says whether the log is appended to; :meth:`Run.resume` loads the state.
    """
    from hpcsgd.train.loop import Run

    train_set, val_set = build_datasets(cfg)
    comm, topology = create_communicator(cfg)
    tracer = get_tracer()
    tracer.rank = comm.rank
    if timeline:
        tracer.enable_timeline(timeline, timeline_iters)
    device = setup_compute(cfg, comm, topology)
    random.seed(cfg["seed"] + comm.rank)
    np.random.seed(cfg["seed"] + comm.rank)
    os.makedirs(out, exist_ok=True)
    log = JsonlLog(os.path.join(out, f"log.rank{comm.rank}.jsonl"), append=resume)
    loader = make_loader(cfg, train_set, comm, device, "train")
    val_loader = make_loader(cfg, val_set, comm, device, "eval")
    iters_per_epoch = len(loader) // cfg["grad_accumulation"]
    if iters_per_epoch < 1:
        raise ValueError(f"one epoch of {len(train_set)} samples has fewer than one step of "
                         f"{cfg['global_batch']} images: lower global_batch")
    model = create_model(cfg, train_set, comm)
    recipe = make_recipe(cfg, model, iters_per_epoch)
    optimizer = hpcsgd.create_multi_node_optimizer(recipe.optimizer, comm,
                                                   double_buffering=cfg["double_buffering"],
                                                   overlap=cfg["overlap"],
                                                   bucket_bytes=cfg["communicator_options"].get("bucket_bytes"))
    return Run(cfg=cfg, out=out, comm=comm, topology=topology, tracer=tracer, device=device, log=log,
               train_set=train_set, val_set=val_set, loader=loader, val_loader=val_loader, model=model,
               loss_fn=loss_from_config(cfg), recipe=recipe, optimizer=optimizer,
               iters_per_epoch=iters_per_epoch, total_iters=math.ceil(cfg["epochs"] * iters_per_epoch),
               noise=noise_scale.from_config(cfg, model, recipe.optimizer, comm),
               noise_reason=noise_scale.disabled_reason(cfg))


def build_datasets(cfg: dict):
    """(train, validation) datasets; ``train_size``, if set, must match what was read."""
    kw = dict(cfg["dataset_options"])
    if cfg["dataset"] == "imagenet_folder":
        kw["on_bad"] = cfg["on_bad"]  # unreadable class folders
    train_set = build_dataset(cfg["dataset"], cfg["data_path"], split="train", **kw)
    val_set = build_dataset(cfg["dataset"], cfg["val_path"] or cfg["data_path"], split="val", **kw)
    if cfg["train_size"] and cfg["train_size"] != len(train_set):
        raise ConfigError(f"config key 'train_size'={cfg['train_size']} (the dry-run's plan) but the "
                          f"training set has {len(train_set)} samples: fix or remove train_size")
    return train_set, val_set


def create_communicator(cfg: dict):
    """(communicator, topology description); collective."""
    comm = hpcsgd.create_communicator(cfg["communicator"], allreduce_grad_dtype=cfg["wire_dtype"],
                                      **cfg["communicator_options"])
    if getattr(comm, "topology", None) is not None:
        topology = comm.topology.describe()
    else:  # a ChainerMN communicator
        topology = {"size": comm.size, "nodes": comm.inter_size, "ranks_per_node": comm.intra_size}
    return comm, topology


def setup_compute(cfg: dict, comm, topology: dict) -> int | None:
    """Threads, CPU kernels, and the GPU of this rank (its id, or None on CPU)."""
    set_threads(cfg["threads"])
    if cfg["kernels"] and not cfg["gpu"]:
        import hpcsgd.kernels

        hpcsgd.kernels.enable(True)
    if not cfg["gpu"]:
        return None
    import cupy  # one GPU per rank, from the physical node-local rank (virtual nodes add no GPUs)

    from hpcsgd.runtime.topology import select_gpu

    device = select_gpu(comm.mpi_comm)  # collective; two ranks on one GPU raise on every rank
    cupy.cuda.Device(device).use()
    topology["device"] = device
    return device


def make_loader(cfg: dict, dataset, comm, device: int | None, role: str) -> Loader:
    """This rank's loader for ``role``; every role gets the device, so batches match the model.

    * ``train``: shuffled, augmented (``augment``), zero-copy views of the shared
      slot (each batch is done with before the next is asked for);
    * ``eval``: the validation shard (``partition='eval'``: every sample once across
      ranks, in order);
    * ``recompute``: training images without augmentation for ``bn_mode: recompute``
      (its own seed, so the training stream is untouched).
    """
    common = dict(rank=comm.rank, size=comm.size, on_bad=cfg["on_bad"], device=device)
    if role == "train":
        return Loader(dataset, cfg["batch_per_rank"], seed=cfg["seed"], shuffle=True,
                      workers=cfg["loader_workers"], prefetch=cfg["prefetch"],
                      transform="train" if cfg["augment"] else "eval", copy=False, **common)
    if role == "eval":
        return Loader(dataset, cfg["eval_batch"], shuffle=False, workers=cfg["loader_workers"],
                      prefetch=cfg["prefetch"], transform="eval", drop_remainder=False, partition="eval",
                      copy=False, **common)
    if role == "recompute":
        return Loader(dataset, cfg["batch_per_rank"], seed=cfg["seed"] + 1, workers=0, transform="eval",
                      **common)
    raise ValueError(f"unknown loader role {role!r}")


def loss_from_config(cfg: dict):
    """The training loss ``loss(logits, t)``: ``loss`` (softmax cross-entropy) with ``label_smoothing``."""
    if cfg["loss"] != "softmax_cross_entropy":
        raise ConfigError(f"config key 'loss'={cfg['loss']!r}: only softmax_cross_entropy is implemented")
    return make_loss(cfg["label_smoothing"])


def create_model(cfg: dict, train_set, comm):
    """The model (float32; parameters from NumPy's global RNG, seeded above), on the GPU if asked."""
    kw = dict(cfg["model_options"])
    chainer.global_config.dtype = np.dtype("float32")
    if cfg["bn_mode"] == "sync":
        kw["comm"] = comm
    model = build_model(cfg["model"], train_set.n_classes, in_channels=train_set.channels,
                        bn_mode=cfg["bn_mode"], zero_init_residual=cfg["zero_init_residual"], **kw)
    if cfg["gpu"]:
        model.to_gpu()
    return model
