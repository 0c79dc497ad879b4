"""Ranks for tests/test_train_bad_data.py: ``on_bad: skip`` from the config, end to end.

    check_train_bad_data.py OUTDIR

An ImageNet-style list dataset with every planted defect: a zero-byte file, a
truncated JPEG, random bytes named .JPEG, a listed file that does not exist
(all bad: skipped), and a grayscale JPEG, a CMYK JPEG and a PNG named .JPEG
(decodable: converted to RGB and trained on, never skipped). The validation
list has one bad file too.

1. run A trains with ``on_bad: skip`` (and label smoothing): summary.json names
   exactly the bad files (gathered from every rank), the per-rank logs name the
   files each rank skipped, and together they are the summary's files;
2. run B stops mid-run and resumes: bitwise the same model as A, and the same
   skipped files with the same counts.
"""

import json
import os
import shutil
import sys

import numpy as np
from mpi4py import MPI
from PIL import Image

from hpcsgd.cli import main as hpcsgd_main

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
base = sys.argv[1]
root = os.path.join(base, "data")
N_TRAIN, BATCH = 24, 3  # every sample is visited each epoch at 1, 2 and 4 ranks (24 = 8 x 3 = 2 x 4 x 3)
BAD_TRAIN = ("zero.JPEG", "truncated.JPEG", "noise.JPEG", "gone.JPEG")
ODD_TRAIN = ("gray.JPEG", "cmyk.JPEG", "png_inside.JPEG")
BAD_VAL = ("val_noise.JPEG",)


def image(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path, quality=90)


def make_data() -> None:
    os.makedirs(root)
    names = [f"img{i}.JPEG" for i in range(N_TRAIN - len(BAD_TRAIN) - len(ODD_TRAIN))]
    for i, n in enumerate(names):
        image(os.path.join(root, n), i)
    open(os.path.join(root, "zero.JPEG"), "wb").close()
    image(os.path.join(root, "truncated.JPEG"), 100)
    data = open(os.path.join(root, "truncated.JPEG"), "rb").read()
    open(os.path.join(root, "truncated.JPEG"), "wb").write(data[: len(data) // 2])
    open(os.path.join(root, "noise.JPEG"), "wb").write(np.random.default_rng(1).bytes(3000))
    Image.new("L", (24, 20), 90).save(os.path.join(root, "gray.JPEG"), quality=90)
    Image.new("CMYK", (24, 20), (0, 255, 255, 0)).save(os.path.join(root, "cmyk.JPEG"), quality=90)
    Image.new("RGB", (24, 20), (20, 200, 60)).save(os.path.join(root, "png_inside.JPEG"), format="PNG")
    train = names + list(BAD_TRAIN) + list(ODD_TRAIN)  # gone.JPEG is listed, never written
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.writelines(f"{n} {i % 3}\n" for i, n in enumerate(train))
    for i in range(5):
        image(os.path.join(root, f"val{i}.JPEG"), 200 + i)
    open(os.path.join(root, "val_noise.JPEG"), "wb").write(np.random.default_rng(2).bytes(500))
    with open(os.path.join(root, "val.txt"), "w") as f:
        val = [f"val{i}.JPEG" for i in range(5)] + list(BAD_VAL)
        f.writelines(f"{n} {i % 3}\n" for i, n in enumerate(val))


config = os.path.join(base, "bad.yaml")
if rank == 0:
    make_data()
    with open(config, "w") as f:
        f.write(f"""model: resnet_small
model_options: {{depth: 8, width: 4}}
dataset: imagenet_list
data_path: {root}
on_bad: skip
label_smoothing: 0.1
batch_per_rank: {BATCH}
epochs: 2
recipe: sgd
kernels: false
loader_workers: 1
log_interval: 2
eval_interval: 0
eval_batch: 4
progress: false
""")
world.Barrier()


def train(out, *extra):
    argv = ["train", config, "--out", out, *extra]
    assert hpcsgd_main(argv) == 0, f"rank {rank}: hpcsgd train {' '.join(argv)} failed"


def full(names):
    return sorted(os.path.join(root, n) for n in names)


A, B = os.path.join(base, "A"), os.path.join(base, "B")
train(A)
logged = set()
for r in range(size):
    for line in open(os.path.join(A, f"log.rank{r}.jsonl")):
        rec = json.loads(line)
        if rec["kind"] == "skipped":
            logged.update(rec["files"])
s = json.load(open(os.path.join(A, "summary.json")))
sk = s["skipped_files"]
assert s["completed"] and s["config"]["label_smoothing"] == 0.1, s["config"]
assert sk["files"] == full(BAD_TRAIN + BAD_VAL), sk["files"]  # the odd-but-decodable files are not here
assert sorted(sk["by_role"]["train"]) == full(BAD_TRAIN), sk["by_role"]
assert sorted(sk["by_role"]["val"]) == full(BAD_VAL), sk["by_role"]
assert all(n >= 2 for n in sk["by_role"]["train"].values()), sk  # every bad file, in both epochs
assert len(sk["by_rank"]) == size and sum(sum(r.values()) for r in sk["by_rank"]) == sk["count"], sk
assert sorted(logged) == sk["files"], (sorted(logged), sk["files"])  # the ranks' logs name them all
assert s["history"][-1]["samples"] == 6, s["history"][-1]  # the bad val file was replaced, not dropped

# 2. stop mid-run, resume: same model, same skipped files and counts
iters = s["iterations"]
train(B, "--set", f"stop_iteration={iters // 2 + 1}", "--set", "checkpoint_interval=1")
train(B, "--resume", "auto")
sb = json.load(open(os.path.join(B, "summary.json")))
assert sb["skipped_files"]["by_role"] == sk["by_role"], (sb["skipped_files"], sk)
with np.load(os.path.join(A, "model.npz")) as za, np.load(os.path.join(B, "model.npz")) as zb:
    diff = [k for k in za.files if not np.array_equal(za[k], zb[k])]
assert not diff, f"resume with skips is not bitwise: {diff[:3]}"
world.Barrier()
if rank == 0:
    shutil.rmtree(root)
print(f"rank {rank}: bad data checks ok")
