"""Ranks for tests/test_timeline.py, and the Chrome-trace validator the test uses.

Rank side (``loop OUT ITERS N``): a small training-shaped loop of N iterations
over the process-wide tracer: data_wait, forward, backward with two gradient
buckets packed on a helper thread (its own track), a real ``MPI_Allreduce``
per bucket (float16 and float32) with bytes/dtype/bucket args, unpack, update,
and a checkpoint span at iteration 2. Only ITERS are recorded; the timeline is
gathered to rank 0 with ``tracer.write(comm=...)``. Rank 0 also writes
OUT.wall.json: the run's wall window in the trace's time base (microseconds).

``validate(path, ranks, iters, wall=None)`` returns the parsed events and raises
AssertionError naming the first problem: every rank a track (pid) named
"rank R", nesting per (pid, tid), real timestamps (finite, non-negative
durations, inside the wall window), bucket events with bytes and dtype, and no
event outside the requested iterations.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time

PHASES = ("data_wait", "forward", "backward", "pack", "allreduce", "unpack", "update", "checkpoint")
BUCKET_PHASES = ("pack", "allreduce", "unpack")
TOL_US = 0.5  # float rounding of (t - t0) * 1e6


def validate(path: str, ranks: int, iters: range, wall: tuple[float, float] | None = None,
             wall_slack_us: float = 50_000.0, require: tuple[str, ...] = ("forward", "backward", "allreduce",
                                                                           "update")) -> list[dict]:
    with open(path) as f:
        doc = json.load(f)
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list), "not a Chrome-trace object"
    events = doc["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    spans = [e for e in events if e.get("ph") == "X"]
    names = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(ranks)}, f"process tracks {names} != ranks 0..{ranks - 1}"
    assert {e["pid"] for e in spans} == set(range(ranks)), "some rank has no events"
    for e in spans:
        where = f"{e.get('name')} on rank {e.get('pid')}"
        for key in ("name", "pid", "tid", "ts", "dur", "args"):
            assert key in e, f"{where}: missing {key!r}"
        assert math.isfinite(e["ts"]) and math.isfinite(e["dur"]), f"{where}: non-finite time"
        assert e["dur"] >= 0, f"{where}: negative duration {e['dur']}"
        it = e["args"].get("iteration")
        assert it in iters, f"{where}: iteration {it} outside the requested {iters}"
        if wall is not None:
            lo, hi = wall
            assert e["ts"] >= lo - wall_slack_us and e["ts"] + e["dur"] <= hi + wall_slack_us, (
                f"{where}: [{e['ts']:.0f}, {e['ts'] + e['dur']:.0f}] us outside the run's wall window "
                f"[{lo:.0f}, {hi:.0f}]")
        if e["name"] in BUCKET_PHASES:
            nbytes, dtype = e["args"].get("bytes"), e["args"].get("dtype")
            assert isinstance(nbytes, int) and nbytes > 0, f"{where}: bucket event without bytes"
            assert isinstance(dtype, str) and dtype, f"{where}: bucket event without dtype"
    for r in range(ranks):
        mine = [e for e in spans if e["pid"] == r]
        seen = {e["name"] for e in mine}
        missing = set(require) - seen
        assert not missing, f"rank {r}: no {sorted(missing)} events"
        assert {e["args"]["iteration"] for e in mine} == set(iters), f"rank {r}: not every requested iter"
        for tid in {e["tid"] for e in mine}:
            _check_nesting([e for e in mine if e["tid"] == tid], f"rank {r} thread {tid}")
    return spans


def _check_nesting(track: list[dict], where: str) -> None:
    """Events on one track either nest or follow each other; they never partly overlap."""
    track = sorted(track, key=lambda e: (e["ts"], -e["dur"]))
    stack: list[dict] = []
    for e in track:
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - TOL_US:
            stack.pop()
        if stack:
            parent = stack[-1]
            assert e["ts"] + e["dur"] <= parent["ts"] + parent["dur"] + TOL_US, (
                f"{where}: {e['name']} [{e['ts']:.1f}+{e['dur']:.1f}] partly overlaps "
                f"{parent['name']} [{parent['ts']:.1f}+{parent['dur']:.1f}]")
        stack.append(e)


def _loop(out: str, iters_text: str, n_iters: int) -> None:
    import numpy as np
    from mpi4py import MPI

    from hpcsgd.runtime.trace import get_tracer, parse_iter_range

    comm = MPI.COMM_WORLD
    tracer = get_tracer()
    tracer.enable_timeline(out, parse_iter_range(iters_text), rank=comm.rank)
    rng = np.random.default_rng(comm.rank)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    grads = [rng.standard_normal(5000).astype(np.float32), rng.standard_normal(3000).astype(np.float32)]
    wire = [np.float16, np.float32]
    comm.Barrier()
    t_start = time.perf_counter()
    for it in range(n_iters):
        tracer.start_iteration(it)
        with tracer.span("data_wait"):
            x = rng.standard_normal((32, 64)).astype(np.float32)
        with tracer.span("forward"):
            y = np.tanh(x @ w)
        with tracer.span("backward"):
            g = x.T @ (1 - y * y)
            packed = [None, None]

            def pack(i: int, packed=packed) -> None:
                with tracer.span("pack", bytes=grads[i].size * np.dtype(wire[i]).itemsize,
                                 dtype=np.dtype(wire[i]).name, bucket=i):
                    packed[i] = grads[i].astype(wire[i])

            helper = threading.Thread(target=pack, args=(0,), name="comm")
            helper.start()
            pack(1)
            helper.join()
        for i, buf in enumerate(packed):
            res = np.empty_like(buf)
            mpi_type = MPI.FLOAT if buf.dtype == np.float32 else MPI.SHORT  # fp16 bits: the sum is irrelevant
            with tracer.span("allreduce", bytes=buf.nbytes, dtype=buf.dtype.name, bucket=i):
                if buf.dtype == np.float32:
                    comm.Allreduce(buf, res, op=MPI.SUM)
                else:
                    comm.Allreduce([buf.view(np.int16), mpi_type], [res.view(np.int16), mpi_type], op=MPI.MAX)
            with tracer.span("unpack", bytes=buf.nbytes, dtype=buf.dtype.name, bucket=i):
                grads[i][...] = res.astype(np.float32) / comm.size
        with tracer.span("update"):
            w -= 1e-3 * g.astype(np.float32)
        if it == 2:
            with tracer.span("checkpoint", iteration=it):
                time.sleep(0.001)
        phases = tracer.pop_phases()
        assert set(phases) >= {"forward", "backward", "allreduce", "update"}, phases
    t_end = time.perf_counter()
    n_events = len(tracer.events)
    recorded = parse_iter_range(iters_text)
    expected_iters = len(range(n_iters)[recorded.start:min(recorded.stop, n_iters)])
    # 10 spans per iteration (data_wait, fwd, bwd, 2 pack, 2 allreduce, 2 unpack, update) + 1 checkpoint.
    per_iter = 10
    assert n_events <= per_iter * expected_iters + 1, f"recorded {n_events} events for {expected_iters} iters"
    tracer.write(comm=comm)
    if comm.rank == 0:
        base = tracer._t0
        with open(out + ".wall.json", "w") as f:
            json.dump({"start_us": (t_start - base) * 1e6, "end_us": (t_end - base) * 1e6}, f)
        print(f"rank 0 wrote {out} ({n_events} own events)")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "loop":
        _loop(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
