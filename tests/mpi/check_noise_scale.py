"""Ranks for tests/test_noise_scale_driver.py: `hpcsgd train` logs B_noise, then the probe command.

    check_noise_scale.py OUTDIR

Cases by world size (each a short `hpcsgd train` on synthetic data):

* 2 ranks: one micro-batch (the local norm from the reduction's pack pass), also
  with overlap and with double buffering (one-step-stale gradients, paired with the
  reduction that produced them); two micro-batches with overlap (per micro-batch:
  only the first is measured locally);
* 1 rank: two micro-batches (measured); one micro-batch (nothing to compare:
  nothing logged, summary says why).

Checked: every train record of the JSONL logs carries the estimates, the same
on every rank; the raw estimates follow Appendix A from the logged norms;
summary.json, the history and curves.png carry B_noise.
"""

import contextlib
import io
import json
import os
import sys

from mpi4py import MPI

from hpcsgd.cli import main as hpcsgd_main
from hpcsgd.train.noise_scale import estimate, ratio

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
base = sys.argv[1]
B = 4  # images per micro-batch
ITERS = 6

config = os.path.join(base, "tiny.yaml")
if rank == 0:
    os.makedirs(base, exist_ok=True)
    with open(config, "w") as f:
        f.write(f"""model: resnet_small
model_options: {{depth: 8, width: 4}}
dataset: synthetic
dataset_options: {{shape: [1, 8, 8], n_classes: 4, n: 400, pool: 16}}
batch_per_rank: {B}
recipe: sgd
kernels: false
loader_workers: 0
log_interval: 2
eval_interval: 0
eval_batch: 50
progress: false
""")
world.Barrier()


def train(out, accum, *extra):
    iters_per_epoch = (400 // (B * size)) // accum
    argv = ["train", config, "--out", out, "--set", f"grad_accumulation={accum}",
            "--set", f"epochs={ITERS / iters_per_epoch}", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = hpcsgd_main(argv)
    assert rc == 0, f"rank {rank}: hpcsgd {' '.join(argv)} returned {rc}"


def records(out):
    with open(os.path.join(out, f"log.rank{rank}.jsonl")) as f:
        return [json.loads(x) for x in f if json.loads(x)["kind"] == "train"]


def check_measured(out, accum, applied, source):
    recs = records(out)
    assert len(recs) == ITERS // 2, recs
    noise = [r["noise_scale"] for r in recs]
    assert noise == world.bcast(noise), "every rank logs the same estimates"
    for n in noise:
        assert n["b_small"] == B and n["b_big"] == B * size * accum, n
        g2, tr = estimate(n["small_sq_raw"], n["big_sq_raw"], B, B * size * accum)
        assert abs(g2 - n["grad_sq_raw"]) <= 1e-9 * abs(tr), n
        assert abs(tr - n["trace_sigma_raw"]) <= 1e-9 * abs(tr), n
        assert n["b_noise_raw"] == ratio(tr, g2)
        assert n["small_sq_raw"] > 0 and n["big_sq_raw"] > 0
    assert noise[-1]["steps"] == applied, (noise[-1], applied)
    if rank == 0:
        s = json.load(open(os.path.join(out, "summary.json")))
        ns = s["noise_scale"]
        assert ns["measured"] and ns["steps"] == applied and ns["b_big"] == B * size * accum, ns
        assert ns["trace_sigma"] > 0 and ns["local_norms"] == source, ns
        train_hist = [h for h in s["history"] if h["kind"] == "train"]
        assert all("b_noise" in h and "b_noise_raw" in h for h in train_hist), train_hist
        assert os.path.getsize(os.path.join(out, "curves.png")) > 1000


if size >= 2:
    train(os.path.join(base, "r2"), 1)
    check_measured(os.path.join(base, "r2"), 1, ITERS, "PackPassLocalNorms")
    train(os.path.join(base, "r2ov1"), 1, "--set", "overlap=true")
    check_measured(os.path.join(base, "r2ov1"), 1, ITERS, "PackPassLocalNorms")
    train(os.path.join(base, "r2ov"), 2, "--set", "overlap=true")
    check_measured(os.path.join(base, "r2ov"), 2, ITERS, "DriverLocalNorms")
    train(os.path.join(base, "r2db"), 1, "--set", "double_buffering=true")
    check_measured(os.path.join(base, "r2db"), 1, ITERS - 1, "PackPassLocalNorms")  # step 0 applies nothing
elif size == 1:
    train(os.path.join(base, "r1acc"), 2)
    check_measured(os.path.join(base, "r1acc"), 2, ITERS, "DriverLocalNorms")
    train(os.path.join(base, "r1"), 1)
    assert all("noise_scale" not in r for r in records(os.path.join(base, "r1")))
    s = json.load(open(os.path.join(base, "r1", "summary.json")))
    assert s["noise_scale"] == {"measured": False, "reason": "1 rank and 1 micro-batch: no second batch "
                                                            "size to compare"}, s["noise_scale"]
print(f"rank {rank}: noise scale checks ok", flush=True)
