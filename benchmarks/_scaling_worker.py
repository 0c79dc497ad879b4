"""Rank side of ``benchmarks/scaling.py``: one configuration's timed training steps on every rank.

``scaling.py --worker`` runs this under ``mpiexec -n N``. Each rank builds the
model and its framework's optimizer (hpcsgd's communicator, hpcsgd's bucketed
reducer with or without overlap, or ChainerMN's naive communicator), times
``warmup + iters`` steps on synthetic batches made before the loop, and rank 0
writes the medians to ``--json``. Phases come from hpcsgd's tracer; for
ChainerMN the allreduce is timed around its ``multi_node_mean_grad``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

PHASES = ("data_wait", "forward", "backward", "pack", "allreduce", "unpack", "update")
COMM_PHASES = ("pack", "allreduce", "unpack")


def _thread_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info

        return [{k: d.get(k) for k in ("internal_api", "num_threads", "architecture", "version")}
                for d in threadpool_info()]
    except Exception as e:  # informative only
        return [{"error": str(e)}]


def _optimizer(a: argparse.Namespace, world, model, tracer):
    """``(comm, optimizer, reducer)`` of ``a.framework``; ``reducer`` is None except for the bucketed ones."""
    import chainer

    from hpcsgd.models import count_params

    base = chainer.optimizers.MomentumSGD(lr=0.01, momentum=0.9)
    if a.framework == "chainermn":
        import chainermn

        comm = chainermn.create_communicator("naive", mpi_comm=world)
        mean_grad = comm.multi_node_mean_grad

        def timed_mean_grad(*args, **kwargs):
            with tracer.span("allreduce", bytes=4 * count_params(model), dtype="float32"):
                return mean_grad(*args, **kwargs)

        comm.multi_node_mean_grad = timed_mean_grad
        opt = chainermn.create_multi_node_optimizer(base, comm)
        opt.setup(model)
        return comm, opt, None
    import hpcsgd

    comm = hpcsgd.create_communicator(a.communicator, mpi_comm=world)
    if a.framework in ("hpcsgd-overlap", "hpcsgd-nooverlap"):
        from hpcsgd.comm.overlap import OverlappedReducer

        reducer = OverlappedReducer(comm, model, overlap=a.framework == "hpcsgd-overlap")
        base.setup(model)
        comm.bcast_data(model)
        return comm, base, reducer
    opt = hpcsgd.create_multi_node_optimizer(base, comm)
    opt.setup(model)
    return comm, opt, None


def _step(a, model, opt, reducer, tracer, x, t) -> dict:
    """One training step; returns its phases (s), compute phases net of communication nested in them."""
    import chainer.functions as F

    with tracer.span("forward"):
        loss = F.softmax_cross_entropy(model(x), t)
    c0 = sum(tracer.phase_seconds.get(p, 0.0) for p in COMM_PHASES)
    with tracer.span("backward"):
        model.cleargrads()
        if reducer is not None:
            with reducer:
                loss.backward()
        else:
            loss.backward()
    nested_comm = sum(tracer.phase_seconds.get(p, 0.0) for p in COMM_PHASES) - c0
    if reducer is not None:
        reducer.wait()
        with tracer.span("update"):
            opt.update()
    elif a.framework == "chainermn":
        with tracer.span("update"):
            opt.update()
    else:
        opt.update()  # hpcsgd's multi-node optimizer traces pack / allreduce / unpack / update itself
    ph = tracer.pop_phases()
    ph["backward"] = ph.get("backward", 0.0) - nested_comm  # comm hidden in backward is not compute
    if a.framework == "chainermn":
        ph["update"] = ph.get("update", 0.0) - ph.get("allreduce", 0.0)
    return ph


def worker(a: argparse.Namespace) -> None:
    import chainer
    import numpy as np
    from mpi4py import MPI

    import hpcsgd.kernels
    from hpcsgd.models import build_model
    from hpcsgd.runtime.trace import get_tracer

    hpcsgd.kernels.enable(threads=1)
    world = MPI.COMM_WORLD
    tracer = get_tracer()
    tracer.rank = world.rank
    if a.timeline:
        from hpcsgd.runtime.trace import parse_iter_range

        tracer.enable_timeline(a.timeline, parse_iter_range(a.timeline_iters), rank=world.rank)
    kw, size, batch, classes = json.loads(a.spec)
    chainer.config.train = True
    model = build_model(a.model, n_classes=classes, in_channels=3, **kw)
    rng = np.random.default_rng(world.rank)
    batches = [(rng.standard_normal((batch, 3, size, size)).astype(np.float32),
                rng.integers(0, classes, batch).astype(np.int32)) for _ in range(2)]
    comm, opt, reducer = _optimizer(a, world, model, tracer)
    loadavg_before = os.getloadavg()
    iters, phases = [], []
    world.Barrier()
    for it in range(a.warmup + a.iters):
        tracer.start_iteration(it)
        t0 = time.perf_counter()
        with tracer.span("data_wait"):
            x, t = batches[it % len(batches)]
        ph = _step(a, model, opt, reducer, tracer, x, t)
        t1 = time.perf_counter()
        if it >= a.warmup:
            iters.append(t1 - t0)
            phases.append(ph)
    if a.timeline:
        tracer.write(comm=world)
    all_iters = world.gather(iters, root=0)
    if world.rank == 0:
        rec = _record(a, world.size, model, kw, size, batch, iters, all_iters, phases, reducer)
        rec["loadavg_before"] = loadavg_before
        with open(a.json, "w") as f:
            json.dump(rec, f, default=str)


def _record(a, ranks, model, kw, size, batch, iters, all_iters, phases, reducer) -> dict:
    """Rank 0's record of the configuration: medians of the timed steps (s) and what ran."""
    from hpcsgd.models import count_params

    names = sorted({k for p in phases for k in p})
    med = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in names}
    it_s = statistics.median(iters)
    return {
        "model": a.model, "framework": a.framework, "ranks": ranks,
        "nodes": int(os.environ.get("HPCSGD_BENCH_NODES", "1")),
        "communicator": "naive (chainermn)" if a.framework == "chainermn" else a.communicator,
        "wire_dtype": "float32", "per_rank_batch": batch, "image_size": size, "model_kwargs": kw,
        "params": count_params(model), "param_arrays": sum(1 for _ in model.params()),
        "iteration_s": it_s, "iteration_s_all": iters,
        "iteration_s_per_rank_median": [statistics.median(v) for v in all_iters],
        "phases_s": med, "other_s": it_s - sum(med.get(k, 0.0) for k in PHASES),
        "images_per_s": ranks * batch / it_s, "loadavg_after": os.getloadavg(), "threads": _thread_info(),
        "overlap_stats": getattr(reducer, "stats", None) if reducer is not None else None,
    }
