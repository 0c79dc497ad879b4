"""Time of the float16 wire schemes on the ResNet-50 gradient set, with float32 in the same run.

Why: the per-message scale (``half_scaling='chunk'``) adds a maximum pass per sent
chunk and a float32 pass for each owner's sum; this measures what that costs
against the pre-dividing scheme and against float32, as medians over interleaved
rounds (every case once per round, so machine load hits all alike; a repeat's
time is the slowest rank's).

Run with one rank per (virtual) node so the float16 stage is on the path::

    HPCSGD_RANKS_PER_NODE=1 mpiexec -n 2 python -m mpi4py benchmarks/fp16_wire_cost.py [--repeats 15]
    HPCSGD_RANKS_PER_NODE=2 mpiexec -n 4 python -m mpi4py benchmarks/fp16_wire_cost.py   # 2 x 2

Also reported: the slowest rank's process CPU time (a steer under load, where wall time is
not). Writes ``benchmarks/results/fp16_wire_cost.json``
(``--quick``: a small gradient set, 3 rounds, into a temporary file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from allreduce import grad_model, resnet50_shapes  # noqa: E402

import hpcsgd  # noqa: E402

CASES = (
    ("flat float32", "flat", {"allreduce_grad_dtype": "float32"}),
    ("flat float16 predivide", "flat", {"allreduce_grad_dtype": "float16", "half_scaling": "predivide"}),
    ("flat float16 chunk", "flat", {"allreduce_grad_dtype": "float16", "half_scaling": "chunk"}),
    ("hierarchical float32", "hierarchical", {"inter_dtype": "float32"}),
    ("hierarchical float16 predivide", "hierarchical", {"half_scaling": "predivide"}),
    ("hierarchical float16 chunk (default)", "hierarchical", {}),
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/fp16_wire_cost.json")
    a = p.parse_args(argv)
    world = MPI.COMM_WORLD
    shapes = resnet50_shapes()
    if a.quick:
        shapes, a.repeats = shapes[:20], 3
        if a.out == p.get_default("out"):
            a.out = os.path.join(tempfile.gettempdir(), "fp16_wire_cost_quick.json")
    model = grad_model(shapes, seed=world.rank)
    saved = [p.grad.copy() for _, p in sorted(model.namedparams())]
    comms = [(label, hpcsgd.create_communicator(name, **cfg)) for label, name, cfg in CASES]
    times = {label: [] for label, _ in comms}
    cpu = {label: [] for label, _ in comms}
    load0 = os.getloadavg()
    for r in range(a.repeats + 1):  # round 0 warms up (numba, buffers, windows)
        for label, comm in comms:
            for (_, prm), g in zip(sorted(model.namedparams()), saved):
                prm.grad[...] = g
            world.Barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            comm.multi_node_mean_grad(model)
            dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            dc = world.allreduce(time.process_time() - c0, op=MPI.MAX)
            if r:
                times[label].append(dt)
                cpu[label].append(dc)
    nbytes = 4 * sum(int(np.prod(s)) for _, s in shapes)
    res = {"ranks": world.size, "nodes": comms[-1][1].inter_size, "bytes_float32": nbytes,
           "repeats": a.repeats, "loadavg": [load0, os.getloadavg()],
           "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
           "median_cpu_ms": {k: 1e3 * statistics.median(v) for k, v in cpu.items()}}
    for _, comm in comms:
        comm.finalize()
    if world.rank == 0:
        base = res["median_ms"]["flat float32"]
        for k, v in res["median_ms"].items():
            print(f"{k:38s} {v:9.1f} ms  x{v / base:.2f} of flat float32  "
                  f"(process CPU {res['median_cpu_ms'][k]:.1f} ms)")
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
