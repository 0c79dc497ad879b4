"""Ranks for tests/test_train.py: `hpcsgd train` end to end, many checks in one launch.

    check_train.py OUTDIR

1. run A trains a tiny ResNet on synthetic data for N iterations (evaluation,
   summary.json, logs, curves, timeline are checked);
2. run B stops at k < N (mid-epoch) with checkpoints every 2 iterations, then
   ``--resume auto`` trains to N: model.npz must be bitwise equal to A's;
3. run C is B's stopped state with its newest checkpoint corrupted: the resume
   says so, falls back to the previous good one, and still ends bitwise equal;
4. a replica that differs on one rank makes save_checkpoint fail on every rank;
5. ``--dry-run`` under mpiexec prints the plan once (rank 0) with the real topology.
"""

import contextlib
import io
import json
import os
import shutil
import sys

import numpy as np
from mpi4py import MPI

from hpcsgd.cli import main as hpcsgd_main

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
base = sys.argv[1]
N, K = 10, 5  # 101 samples / (8 x size) -> at most 6 iterations per epoch: K is mid-epoch

config = os.path.join(base, "tiny.yaml")
if rank == 0:
    os.makedirs(base, exist_ok=True)
    with open(config, "w") as f:
        f.write("""model: resnet_small
model_options: {depth: 8, width: 4}
dataset: synthetic
dataset_options: {shape: [1, 8, 8], n_classes: 10, n: 101, pool: 101}
batch_per_rank: 4
grad_accumulation: 2
recipe: goyal
recipe_options: {warmup_epochs: 9.0}
kernels: false
loader_workers: 0
log_interval: 3
eval_batch: 7
progress: false
""")
world.Barrier()


def train(out, *extra, capture=False):
    argv = ["train", config, "--out", out, "--set", f"epochs={N / iters_per_epoch()}", *extra]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
        rc = hpcsgd_main(argv)
    assert rc == 0, f"rank {rank}: hpcsgd train {' '.join(argv)} returned {rc}"
    return buf.getvalue()


def iters_per_epoch():
    return (101 // (4 * size)) // 2


def params(out):
    with np.load(os.path.join(out, "model.npz")) as z:
        return {k: z[k] for k in z.files}


def assert_bitwise(a, b, what):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys(), what
    diff = [k for k in pa if not np.array_equal(pa[k], pb[k])]
    assert not diff, f"{what}: {len(diff)} arrays differ, e.g. {diff[:3]}"


# 1. uninterrupted run A, with timeline
A, B, C = (os.path.join(base, x) for x in "ABC")
timeline = os.path.join(base, "timeline.json")
out = train(A, "--timeline", timeline, "--timeline-iters", "2:4", capture=True)
if rank == 0:
    s = json.load(open(os.path.join(A, "summary.json")))
    assert s["completed"] and s["iterations"] == N, s
    assert s["config"]["global_batch"] == 8 * size and s["config"]["grad_accumulation"] == 2
    assert s["history"][-1]["kind"] == "eval" and s["history"][-1]["samples"] == 101, s["history"][-1]
    assert 0.0 <= s["top5"] <= 1.0 and s["top1"] <= s["top5"]
    for p in ("forward", "backward", "update", "data_wait"):
        assert s["phase_mean_s"][p] > 0 and s["phase_max_s"][p] >= s["phase_mean_s"][p], (p, s)
    assert s["topology"]["size"] == size and {"numpy", "chainer", "mpi4py"} <= set(s["versions"])
    assert os.path.getsize(os.path.join(A, "curves.png")) > 1000
    assert "final test accuracy: top-1" in out, out
    events = json.load(open(timeline))["traceEvents"]
    assert {e["pid"] for e in events} == set(range(size)), "every rank is a track"
    spans = [e for e in events if e.get("ph") == "X"]
    assert {e["args"]["iteration"] for e in spans} == {2, 3}, "only the iterations asked for"
    assert {"forward", "backward", "data_wait"} <= {e["name"] for e in spans}
lines = [json.loads(x) for x in open(os.path.join(A, f"log.rank{rank}.jsonl"))]
kinds = [x["kind"] for x in lines]
assert "train" in kinds and "eval" in kinds and kinds[-1] == "end", kinds
assert all(x["phase_max_s"]["forward"] >= x["phase_mean_s"]["forward"] for x in lines if x["kind"] == "train")

# 2. stop at K, resume to N
train(B, "--set", f"stop_iteration={K}", "--set", "checkpoint_interval=2")
if rank == 0:
    s = json.load(open(os.path.join(B, "summary.json")))
    assert not s["completed"] and s["iterations"] == K and s["top1"] is None, s
    names = sorted(os.listdir(os.path.join(B, "checkpoints")))
    assert names == [f"ckpt-{i:08d}.{e}" for i in (2, 4, 5) for e in ("json", "npz")], names
    shutil.copytree(B, C)
world.Barrier()
said = train(B, "--resume", "auto", capture=True)
if rank == 0:
    newest = os.path.join(B, "checkpoints", f"ckpt-{K:08d}.npz")
    assert f"resumed from {newest} at iteration {K}" in said, said
    assert_bitwise(A, B, f"train to {N} vs stop at {K} + resume")

# 3. corrupted newest checkpoint: fall back to the previous one (iteration 4), still bitwise equal
if rank == 0:
    path = os.path.join(C, "checkpoints", f"ckpt-{K:08d}.npz")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))
world.Barrier()
said = train(C, "--resume", "auto", capture=True)
if rank == 0:
    assert "failed its checksum" in said and "falling back" in said, said
    assert "at iteration 4" in said, said
    assert_bitwise(A, C, "resume after falling back to the previous checkpoint")

# 4. diverged replicas are refused on every rank
if size > 1:
    import chainer.links as L

    from hpcsgd.errors import ParameterMismatchError
    from hpcsgd.train.checkpoint import save_checkpoint

    model = L.Linear(3, 2)
    model.W.array[...] = 1.0
    if rank == size - 1:
        model.W.array[0, 0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    try:
        save_checkpoint(os.path.join(base, "never"), {"iteration": 1, "model": model}, world)
        raise AssertionError(f"rank {rank}: diverged replicas were checkpointed")
    except ParameterMismatchError as e:
        assert "'/W'" in str(e) and f"ranks [{size - 1}]" in str(e), str(e)
    assert not os.path.exists(os.path.join(base, "never"))

# 5. dry run under mpiexec: rank 0 prints the real topology once
out = train(os.path.join(base, "dry"), "--dry-run", capture=True)
if rank == 0:
    assert f"# topology: {size} ranks on" in out and f"{size} ranks x 4 x 2 = {8 * size}" in out, out
else:
    assert out == "", out
print(f"rank {rank}: train checks ok")
