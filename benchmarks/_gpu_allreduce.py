"""GPU half of ``benchmarks/allreduce.py --gpu``: the ResNet-50 gradient set on CuPy, NCCL communicators.

Cases (medians of interleaved repeats, each timed from a device synchronise to
a device synchronise, max over ranks): hpcsgd ``nccl`` float32/float16,
``hierarchical`` float32/float16 (GPU branch), ``dummy`` (pack + unpack only),
and the peer reference: one ``ncclAllReduce`` of a packed float32 buffer (no
packing), which is what the hpcsgd cases add their cost to.

On one GPU only one rank can run (NCCL refuses two ranks of a communicator on
one device, and :func:`hpcsgd.runtime.topology.select_gpu` refuses it earlier): the
allreduce is then a device-local copy, so the numbers measure hpcsgd's own
cost per gradient mean on the GPU (pack, unpack, kernel launches, the one
host sync) against NCCL's floor, not interconnect bandwidth.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks._bandwidth import allreduce_bandwidth


def run(args, resnet50_shapes, grad_model) -> int:
    from mpi4py import MPI

    import hpcsgd
    from hpcsgd.comm import nccl as gpu
    from hpcsgd.runtime.topology import select_gpu

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    device = select_gpu(comm)
    import cupy

    cupy.cuda.Device(device).use()
    shapes = resnet50_shapes()
    if args.quick:
        shapes = shapes[::4]
    model = grad_model(shapes, seed=rank)
    model.to_device(device)
    params = [p for _, p in sorted(model.namedparams())]
    originals = [p.grad.copy() for p in params]
    nbytes = sum(int(g.nbytes) for g in originals)

    def reset():
        for p, g in zip(params, originals):
            p.grad[...] = g

    cases = {}
    packed = cupy.concatenate([g.reshape(-1) for g in originals])
    world = gpu.nccl_comm_over(comm, device)
    nccl = gpu._cupy_nccl()[1]
    cases["NCCL allreduce packed f32 (no pack)"] = lambda: world.allReduce(
        packed.data.ptr, packed.data.ptr, packed.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
        cupy.cuda.get_current_stream().ptr)
    comms = []
    for name in ("nccl", "hierarchical"):
        for dt in ("float32", "float16"):
            c = hpcsgd.create_communicator(name, allreduce_grad_dtype=dt)
            comms.append(c)
            cases[f"hpcsgd {name} {dt}"] = (lambda c=c: c.multi_node_mean_grad(model))
    dummy = hpcsgd.create_communicator("dummy")
    cases["hpcsgd dummy f32 (pack+unpack only)"] = lambda: dummy.multi_node_mean_grad(model)

    def timed(fn) -> float:
        reset()
        cupy.cuda.Device(device).synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        cupy.cuda.Device(device).synchronize()
        return comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)

    errors = {}
    for k, fn in list(cases.items()):  # warm-up: kernel compilation, NCCL set-up
        try:
            timed(fn)
        except Exception as e:  # record and drop the case, keep measuring the others
            errors[k] = f"{type(e).__name__}: {e}"
            cases.pop(k)
    repeats = 3 if args.quick else args.repeats
    times: dict[str, list] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    world.destroy()
    if rank != 0:
        return 0
    meta = {"ranks": n, "gpu": cupy.cuda.runtime.getDeviceProperties(device)["name"].decode(),
            "cupy": cupy.__version__, "nccl": int(nccl.get_version()), "quick": args.quick,
            "repeats": repeats, "arrays": len(shapes), "grad_bytes": nbytes}
    return report(args, times, errors, meta)


def report(args, times: dict, errors: dict, meta: dict) -> int:
    """Rank 0: medians, algbw/busbw and the ratio to NCCL's packed allreduce, as JSON and a table.

    ``times``: seconds per repeat of each case (the slowest rank's); ``meta``: ranks, gpu, cupy,
    nccl, quick, repeats, arrays, grad_bytes. Returns 1 when a case failed, else 0.
    """
    n, nbytes, repeats = meta["ranks"], meta["grad_bytes"], meta["repeats"]
    base_key = "NCCL allreduce packed f32 (no pack)"
    base = float(np.median(times[base_key])) if base_key in times else None
    results = {}
    for k, ts in times.items():
        t = float(np.median(ts))
        results[k] = {"median_ms": t * 1e3, "min_ms": float(np.min(ts)) * 1e3,
                      **allreduce_bandwidth(nbytes, t, n),
                      "ratio_to_nccl_packed": t / base if base else None,
                      "repeats_ms": [x * 1e3 for x in ts]}
    out = {**meta, "resnet50_gpu": results, "errors": errors,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "host": platform.node(), "cpus": os.cpu_count(),
           "note": "1 rank per GPU; on one GPU NCCL's allreduce is a local copy: this measures hpcsgd's "
                   "pack/unpack/launch cost against NCCL's floor, not link bandwidth",
           "command": f"mpiexec -n {n} python -m mpi4py benchmarks/allreduce.py --gpu"
                      + (" --quick" if args.quick else f" --repeats {repeats}")}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    w = max((len(k) for k in results), default=10)
    print(f"ResNet-50 gradients on {out['gpu']}: {meta['arrays']} arrays, {nbytes / 1e6:.1f} MB, {n} rank(s)")
    for k, r in results.items():
        ratio = f"x{r['ratio_to_nccl_packed']:.2f} of NCCL packed" if r["ratio_to_nccl_packed"] else ""
        print(f"  {k:<{w}}  {r['median_ms']:8.3f} ms  algbw {r['algbw_GBps']:7.1f} GB/s  "
              f"busbw {r['busbw_GBps']:7.1f} GB/s  {ratio}")
    for k, e in errors.items():
        print(f"  {k:<{w}}  FAILED: {e}")
    print(f"wrote {path}")
    return 1 if errors else 0
