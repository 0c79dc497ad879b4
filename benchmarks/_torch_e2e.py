"""PyTorch DDP (gloo) side of benchmarks/e2e.py: the same training job, images/s.

Runs under a separate interpreter (``--torch-python``), never imports hpcsgd
and is never an hpcsgd dependency (needs torch, numpy and, for the JPEG
folder, Pillow). Starts ``--ranks`` processes (torch.multiprocessing, gloo on
127.0.0.1), each with ``--threads`` intra-op threads, and trains with
momentum SGD (lr 0.1, momentum 0.9, weight decay 1e-4) on:

* ``fmnist``: the Fashion-MNIST IDX files, decoded once into memory and
  normalised as hpcsgd does (mean 72.94, std 90.02 in 0..255 units), each rank
  reading its shard of a seeded per-epoch permutation (no DataLoader: the data
  are in memory, as in hpcsgd's loader);
* ``synthetic``: a pool of random uint8 images converted per batch;
* ``folder``: ``ROOT/train/<class>/*.JPEG`` through torch's own DataLoader
  (``--workers`` processes) with an Inception-style random-resized crop to
  224, flip and ImageNet normalisation (Pillow, as hpcsgd's default decoder).

Rank 0 prints one JSON line: images/s over all ranks for each interval of
``--interval`` steps after ``--warmup`` steps, the data-wait seconds per
step, and the BLAS/oneDNN configuration torch ran with.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _torch_resnet50 import resnet50  # noqa: E402

FMNIST_MEAN, FMNIST_STD = 72.94, 90.02
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return torch.relu(self.body(x) + s)


def resnet_small(depth, width, in_ch, n_classes):
    """hpcsgd.models.resnet_small: 3x3 stem, stages (w, 2w, 4w) / strides (1, 2, 2), GAP, FC."""
    n = (depth - 2) // 6
    layers = [nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for i, w in enumerate((width, 2 * width, 4 * width)):
        for j in range(n):
            layers.append(Basic(cin, w, 2 if (j == 0 and i > 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes)]
    return nn.Sequential(*layers)


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(root, stem):
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"{stem}(.gz) not in {root}")


def in_memory_batches(images, labels, batch, rank, size, seed, norm):
    """Endless per-rank batches of a seeded per-epoch permutation (drop remainder)."""
    n_iter = len(images) // (batch * size)
    epoch = 0
    while True:
        perm = np.random.default_rng(seed + epoch).permutation(len(images))
        for k in range(n_iter):
            idx = perm[(k * size + rank) * batch:(k * size + rank + 1) * batch]
            x = torch.from_numpy(images[np.sort(idx)]).float()
            yield norm(x), torch.from_numpy(labels[np.sort(idx)].astype(np.int64))
        epoch += 1


class JpegFolder(torch.utils.data.Dataset):
    def __init__(self, root, size=224):
        classes = sorted(os.listdir(os.path.join(root, "train")))
        self.items = [(os.path.join(root, "train", c, f), k) for k, c in enumerate(classes)
                      for f in sorted(os.listdir(os.path.join(root, "train", c)))]
        self.size = size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.inv = 1.0 / torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            box = None
            for _ in range(10):
                area = w * h * random.uniform(0.08, 1.0)
                ar = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
                if 0 < cw <= w and 0 < ch <= h:
                    x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
                    box = (x0, y0, x0 + cw, y0 + ch)
                    break
            if box is None:
                s = min(w, h)
                box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
            if random.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return (x - self.mean) * self.inv, label


def make_stream(a, rank, size):
    if a.data == "fmnist":
        images = read_idx(_idx_file(a.data_path, "train-images-idx3-ubyte"))[:, None]
        labels = read_idx(_idx_file(a.data_path, "train-labels-idx1-ubyte"))
        return in_memory_batches(images, labels, a.batch, rank, size, a.seed,
                                 lambda x: (x - FMNIST_MEAN) * (1.0 / FMNIST_STD)), 10
    if a.data == "synthetic":
        c, h, w = a.shape
        rng = np.random.default_rng(a.seed + rank)
        pool = rng.integers(0, 256, size=(max(4 * a.batch, 64), c, h, w), dtype=np.uint8)
        labels = rng.integers(0, a.classes, size=len(pool)).astype(np.int32)
        return in_memory_batches(pool, labels, a.batch, 0, 1, a.seed,
                                 lambda x: (x - 127.5) * (1.0 / 73.9)), a.classes
    ds = JpegFolder(a.data_path)
    sampler = torch.utils.data.distributed.DistributedSampler(ds, size, rank, shuffle=True, seed=a.seed)
    loader = torch.utils.data.DataLoader(ds, a.batch, sampler=sampler, num_workers=a.workers,
                                         drop_last=True, persistent_workers=a.workers > 0,
                                         prefetch_factor=2 if a.workers else None)
    n_classes = len(os.listdir(os.path.join(a.data_path, "train")))

    def gen():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    return gen(), n_classes


def _blas_summary() -> list:
    """torch's oneDNN version line and BLAS/LAPACK choice (from its build configuration)."""
    import re

    cfg = torch.__config__.show()
    out = [ln.strip("- ").strip() for ln in cfg.splitlines() if "DNN" in ln and "v" in ln][:1]
    out += re.findall(r"(?:BLAS_INFO|LAPACK_INFO)=[^,]*", cfg)
    return out


def worker(rank, a, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    torch.manual_seed(a.seed)
    random.seed(a.seed + rank)
    stream, n_classes = make_stream(a, rank, a.ranks)
    if a.model == "resnet_small":
        model = resnet_small(a.depth, a.width, 1 if a.data == "fmnist" else 3, n_classes)
    else:
        model = resnet50(n_classes)
    model = nn.parallel.DistributedDataParallel(model.train())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    intervals, waits = [], []
    total = a.warmup + a.intervals * a.interval
    t0 = None
    for step in range(total):
        if step == a.warmup:
            dist.barrier()
            t0, wait = time.perf_counter(), 0.0
        tw = time.perf_counter()
        x, t = next(stream)
        if t0 is not None:
            wait += time.perf_counter() - tw
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), t).backward()
        opt.step()
        if t0 is not None and (step + 1 - a.warmup) % a.interval == 0:
            now = time.perf_counter()
            intervals.append(a.ranks * a.batch * a.interval / (now - t0))
            waits.append(wait / a.interval)
            t0, wait = now, 0.0
    if rank == 0:
        queue.put({"images_per_s": intervals, "data_wait_s_per_step": waits,
                   "seconds_per_step": [a.ranks * a.batch / v for v in intervals],
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "mkldnn": bool(torch.backends.mkldnn.is_available()),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "blas": _blas_summary(),
                   "loadavg": os.getloadavg()})
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("resnet_small", "resnet50"), required=True)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--data", choices=("fmnist", "synthetic", "folder"), required=True)
    p.add_argument("--data-path", default=None)
    p.add_argument("--shape", type=int, nargs=3, default=(3, 64, 64))
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, required=True, help="images per rank per step")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes per rank (folder)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--intervals", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=29517)
    a = p.parse_args()
    if a.data in ("fmnist", "folder") and not a.data_path:
        p.error(f"--data {a.data} needs --data-path")
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=worker, args=(r, a, a.port, queue)) for r in range(a.ranks)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    if any(pr.exitcode != 0 for pr in procs):
        sys.exit(f"a rank failed: exit codes {[pr.exitcode for pr in procs]}")
    print(json.dumps(queue.get()))


if __name__ == "__main__":
    main()
