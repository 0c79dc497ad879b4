"""The training loop of ``hpcsgd train``; it reads top to bottom.

    mpiexec -n 2 hpcsgd train jobs/configs/fashion_mnist.yaml --out runs/fmnist
    mpiexec -n 4 -env HPCSGD_RANKS_PER_NODE 2 hpcsgd train CONFIG.yaml --out DIR --resume auto
    srun --mpi=pmix hpcsgd train jobs/configs/akiba32k.yaml --out $SCRATCH/akiba

Order of events on every rank:

1. communicator (hierarchical by default) and topology; threads, kernels, device;
2. datasets, the sharded loader, model, recipe, multi-node optimizer;
3. resume from a checkpoint (``--resume DIR|auto``) if asked;
4. per iteration: data wait, forward, backward (``grad_accumulation``
   micro-batches), then the optimizer step, whose pack/allreduce/unpack the
   communicator traces itself, then update; every ``log_interval`` the phase
   timings are aggregated across ranks with one small Allgather;
5. evaluation every ``eval_interval`` epochs; checkpoints every
   ``checkpoint_interval`` iterations;
6. at the end: final evaluation, checkpoint, ``model.npz``, ``summary.json``,
   ``curves.png``, and the timeline if asked.
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np

from hpcsgd.models.eval_stats import start_step
from hpcsgd.trace import get_tracer
from hpcsgd.train import checkpoint as ckpt
from hpcsgd.train.evaluate import evaluate
from hpcsgd.train.metrics import COMM_PHASES, JsonlLog, PhaseMeter, plot_curves, versions, write_json
from hpcsgd.train.progress import Progress


def _comm_seconds(tracer) -> float:
    return sum(tracer.phase_seconds.get(p, 0.0) for p in COMM_PHASES)


def accumulate_gradients(model, stream, accum: int, optimizer, tracer) -> float:
    """Forward + backward of ``accum`` micro-batches from ``stream``; returns the step's mean loss.

    Each micro-batch's mean loss is scaled by ``1/accum`` before backward and
    the gradients add up, so with equal micro-batches the result is exactly
    the gradient of the mean loss over their concatenation, i.e. of the
    ``accum``-times larger batch (tested). The one difference is BN: it
    normalizes each micro-batch with that micro-batch's statistics, as if
    every micro-batch were its own worker (the papers' per-worker BN);
    'batch'-mode BN keeps the statistics of all micro-batches of the step.
    """
    import chainer.functions as F

    model.cleargrads()
    start_step(model)
    loss_value = 0.0
    for micro in range(accum):
        with tracer.span("data_wait"):
            x, t = next(stream)
        with tracer.span("forward"):
            loss = F.softmax_cross_entropy(model(x), t)
        c0 = _comm_seconds(tracer)
        with tracer.span("backward"), optimizer.backward_scope(last=micro == accum - 1):
            (loss / accum).backward()
        tracer.phase_seconds["backward"] -= _comm_seconds(tracer) - c0  # overlapped comm is not compute
        loss_value += float(loss.array) / accum
    return loss_value


def _eval_loader(dataset, rank: int, size: int, cfg: dict, device: int | None):
    """This rank's validation shard (``partition='eval'``: every sample once across ranks, in order)."""
    from hpcsgd.data import Loader

    return Loader(dataset, cfg["eval_batch"], rank=rank, size=size, shuffle=False,
                  workers=cfg["loader_workers"], prefetch=cfg["prefetch"], transform="eval",
                  drop_remainder=False, partition="eval", device=device, copy=False)


def train(cfg: dict, out: str, resume: str | None = None, timeline: str | None = None,
          timeline_iters: range | None = None) -> dict:
    """Train as configured (``cfg`` already resolved by :func:`hpcsgd.train.config.resolve`)."""
    import chainer

    import hpcsgd
    from hpcsgd.data import Loader, build_dataset
    from hpcsgd.models import build_model, prepare_for_eval
    from hpcsgd.train.custom_recipe import make_recipe

    t_start = time.perf_counter()
    # 1. Communicator, topology, threads, kernels, device --------------------------------
    comm = hpcsgd.create_communicator(cfg["communicator"], allreduce_grad_dtype=cfg["wire_dtype"],
                                      **cfg["communicator_options"])
    rank, size = comm.rank, comm.size
    if getattr(comm, "topology", None) is not None:
        topology = comm.topology.describe()
    else:  # a ChainerMN communicator
        topology = {"size": size, "nodes": comm.inter_size, "ranks_per_node": comm.intra_size}
    tracer = get_tracer()
    tracer.rank = rank
    if timeline:
        tracer.enable_timeline(timeline, timeline_iters)
    from hpcsgd.kernels.threads import set_threads

    set_threads(cfg["threads"])
    if cfg["kernels"] and not cfg["gpu"]:
        import hpcsgd.kernels

        hpcsgd.kernels.enable(True)
    device = None
    if cfg["gpu"]:  # one GPU per rank, from the physical node-local rank (virtual nodes add no GPUs)
        import cupy

        from hpcsgd.topology import select_gpu

        device = select_gpu(comm.mpi_comm)  # collective; two ranks on one GPU raise on every rank
        cupy.cuda.Device(device).use()
        topology["device"] = device
    random.seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    os.makedirs(out, exist_ok=True)
    log = JsonlLog(os.path.join(out, f"log.rank{rank}.jsonl"), append=bool(resume))

    # 2. Data, model, recipe, optimizer ---------------------------------------------------
    data_kw = dict(cfg["dataset_options"])
    train_set = build_dataset(cfg["dataset"], cfg["data_path"], split="train", **data_kw)
    val_set = build_dataset(cfg["dataset"], cfg["val_path"] or cfg["data_path"], split="val", **data_kw)
    loader = Loader(train_set, cfg["batch_per_rank"], rank=rank, size=size, seed=cfg["seed"],
                    shuffle=True, workers=cfg["loader_workers"], prefetch=cfg["prefetch"],
                    transform="train" if cfg["augment"] else "eval", device=device,
                    copy=False)  # zero-copy views of the shared slot: each batch is done with before the next
    val_loader = _eval_loader(val_set, rank, size, cfg, device)
    accum = cfg["grad_accumulation"]
    iters_per_epoch = len(loader) // accum
    if iters_per_epoch < 1:
        raise ValueError(f"one epoch of {len(train_set)} samples has fewer than one step of "
                         f"{cfg['global_batch']} images: lower global_batch")
    total_iters = math.ceil(cfg["epochs"] * iters_per_epoch)
    model_kw = dict(cfg["model_options"])
    chainer.global_config.dtype = np.dtype("float32")
    if cfg["bn_mode"] == "sync":
        model_kw["comm"] = comm
    model = build_model(cfg["model"], train_set.n_classes, in_channels=train_set.channels,
                        bn_mode=cfg["bn_mode"], zero_init_residual=cfg["zero_init_residual"], **model_kw)
    if cfg["gpu"]:
        model.to_gpu()
    recipe = make_recipe(cfg, model, iters_per_epoch)
    optimizer = hpcsgd.create_multi_node_optimizer(recipe.optimizer, comm,
                                                   double_buffering=cfg["double_buffering"],
                                                   overlap=cfg["overlap"],
                                                   bucket_bytes=cfg["communicator_options"].get("bucket_bytes"))

    # 3. Resume --------------------------------------------------------------------------------
    ckpt_dir = os.path.join(out, "checkpoints")
    iteration, history = 0, []
    source = ckpt_dir if resume == "auto" else resume
    if source and os.path.isdir(os.path.join(source, "checkpoints")):
        source = os.path.join(source, "checkpoints")  # --resume OTHER_OUT_DIR
    if source:
        state = ckpt.load_for_resume(source, comm, log=print if rank == 0 else (lambda _m: None))
        if state is None and resume != "auto":
            raise FileNotFoundError(f"--resume {resume}: no good checkpoint in {source}")
        if state is not None:
            ckpt.from_arrays("model", model, state.arrays)
            ckpt.from_arrays("optimizer", recipe.optimizer, state.arrays)
            iteration, history = state.iteration, state.meta.get("history", [])
            if len(state.rank_states) == size:
                ckpt.restore_rng(state.rank_states[rank]["rng"])
                loader.load_state_dict(state.rank_states[rank]["loader"])
                ckpt.restore_bn_stats(model, state.rank_states[rank]["bn"])
            elif rank == 0:
                print(f"[hpcsgd] checkpoint was written by {len(state.rank_states)} ranks, now {size}: "
                      f"data order restarts within epoch {iteration // iters_per_epoch}")
            if rank == 0:
                print(f"[hpcsgd] resumed from {state.path} at iteration {iteration}")
    # Replicas are identical: the optimizer wrapper broadcast rank 0's parameters at setup, and a
    # resume loads the same bytes on every rank (each checkpoint re-verifies it with a CRC allgather).

    def save(it: int) -> None:
        with tracer.span("checkpoint", iteration=it):
            arrays = {**ckpt.to_arrays("model", model), **ckpt.to_arrays("optimizer", recipe.optimizer)}
            meta = {"iteration": it, "epoch": it / iters_per_epoch, "config": cfg, "world_size": size,
                    "history": history}
            ckpt.save_checkpoint(ckpt_dir, {"iteration": it, "arrays": arrays, "meta": meta, "model": model,
                                            "rank_state": {"rng": ckpt.capture_rng(),
                                                           "loader": loader.state_dict(),
                                                           "bn": ckpt.rank_local_bn_stats(model)}},
                                 comm, keep=cfg["keep_checkpoints"])
        log.write("checkpoint", iteration=it)

    def run_eval(it: int) -> dict:
        recompute = None
        if cfg["bn_mode"] == "recompute":
            recompute = Loader(train_set, cfg["batch_per_rank"], rank=rank, size=size, seed=cfg["seed"] + 1,
                               workers=0, transform="eval")
        prepare_for_eval(model, comm, batches=recompute)
        result = evaluate(model, val_loader, comm, n_total=len(val_set))
        rec = {"kind": "eval", "iteration": it, "epoch": it / iters_per_epoch, **result}
        history.append(rec)
        log.write("eval", **{k: v for k, v in rec.items() if k != "kind"})
        progress.write(f"[hpcsgd] iteration {it} epoch {rec['epoch']:.2f}: "
                       f"val top-1 {100 * rec['top1']:.2f}% "
                       f"top-5 {100 * rec['top5']:.2f}% loss {rec['loss']:.4f} ({rec['samples']} images)")
        return rec

    # 4-5. Iterations ------------------------------------------------------------------------------
    stop = min(total_iters, cfg["stop_iteration"] or total_iters)
    eval_every = max(1, round(cfg["eval_interval"] * iters_per_epoch)) if cfg["eval_interval"] else 0
    if rank == 0:
        print(f"[hpcsgd] {size} ranks on {topology.get('nodes', '?')} node(s), {cfg['model']} on "
              f"{cfg['dataset']}: global batch {cfg['global_batch']} = {size} x {cfg['batch_per_rank']}"
              f" x {accum}, {iters_per_epoch} iterations/epoch, {total_iters} iterations", flush=True)
    progress = Progress(total_iters, initial=iteration, rank0=rank == 0, bar=cfg["progress"],
                        iters_per_epoch=iters_per_epoch)
    meter = PhaseMeter()
    stream, stream_epoch = None, -1
    t_loop, paused_total = time.perf_counter(), 0.0
    while iteration < stop:
        epoch_index = iteration // iters_per_epoch
        if stream is None or stream_epoch != epoch_index:
            loader.set_epoch(epoch_index)  # same epoch as a restored loader state: keeps its position
            stream, stream_epoch = iter(loader), epoch_index
        tracer.start_iteration(iteration)
        recipe.on_iteration(iteration / iters_per_epoch)
        loss_value = accumulate_gradients(model, stream, accum, optimizer, tracer)
        optimizer.update()  # traces pack/allreduce/unpack (communicator) and update (optimizer)
        iteration += 1
        meter.add(tracer.pop_phases(), loss_value, cfg["batch_per_rank"] * accum)
        if iteration % cfg["log_interval"] == 0 or iteration == stop:
            rec = meter.aggregate(comm)
            lr = recipe.hyperparams(iteration / iters_per_epoch).get("lr")
            rec.update(kind="train", iteration=iteration, epoch=iteration / iters_per_epoch, lr=lr,
                       skipped_steps=int(getattr(optimizer, "skipped_steps", 0)))
            history.append({k: rec[k] for k in ("kind", "iteration", "epoch", "loss", "lr", "images_per_s")})
            log.write("train", local_loss=loss_value, **{k: v for k, v in rec.items() if k != "kind"})
            progress.update(iteration, rec["loss"], rec["images_per_s"], lr)
        t_pause = time.perf_counter()
        if eval_every and iteration % eval_every == 0 and iteration < total_iters:
            run_eval(iteration)
        if cfg["checkpoint_interval"] and iteration % cfg["checkpoint_interval"] == 0 and iteration < stop:
            save(iteration)
        paused = time.perf_counter() - t_pause  # evaluation and checkpoints: not training throughput
        meter.exclude(paused)
        paused_total += paused
    train_seconds = time.perf_counter() - t_loop - paused_total
    progress.close()
    if hasattr(optimizer, "finalize"):
        optimizer.finalize()  # double buffering: no reduction left in flight

    # 6. The end: evaluation, checkpoint, model, summary, curves, timeline ------------------------
    completed = iteration >= total_iters
    final = run_eval(iteration) if completed else None
    save(iteration)
    if rank == 0:
        chainer.serializers.save_npz(os.path.join(out, "model.npz"), model)
    phases = meter.run_means_across(comm)
    done_iters = meter.total_iters
    summary = {
        "completed": completed, "iterations": iteration, "total_iterations": total_iters,
        "epochs": iteration / iters_per_epoch, "iterations_this_run": done_iters,
        "top1": final["top1"] if final else None, "top5": final["top5"] if final else None,
        "images_per_s": done_iters * cfg["global_batch"] / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t_start,
        "phase_mean_s": phases["mean"], "phase_max_s": phases["max"],
        "skipped_steps": int(getattr(optimizer, "skipped_steps", 0)),
        "config": cfg, "topology": topology, "versions": versions(), "loadavg": os.getloadavg(),
        "history": history,
    }
    if timeline:
        tracer.write(timeline, comm=comm.mpi_comm)
    if rank == 0:
        write_json(os.path.join(out, "summary.json"), summary)
        plot_curves(history, os.path.join(out, "curves.png"), title=f"{cfg['model']} on {cfg['dataset']}")
    log.write("end", **{k: summary[k] for k in ("iterations", "top1", "top5", "images_per_s",
                                                "wall_seconds")})
    log.close()
    loader.close()
    val_loader.close()
    return summary
