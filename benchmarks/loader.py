"""Loader throughput: hpcsgd.data.Loader vs chainer.iterators.MultiprocessIterator, same transforms.

Generates ImageNet-like JPEGs once (500x375, quality 90, textured so files are
~ImageNet-sized) into a cache folder, then measures, in one run:

* per-image CPU time of decode + transform for each decoder, with and without
  the reduced-size JPEG decode (Pillow ``draft()``), single process;
* images/s of ``Loader`` (workers 1, 2) with the training transform
  (random-resized crop 224, flip, normalize -> float32 NCHW batches);
* images/s of ``MultiprocessIterator`` with the same number of processes
  running the same transform (same crop distribution, flip, normalization,
  float32 CHW output) in two ways:

  - ``chainer_standard`` (the baseline of the target): written the standard
    Chainer way, ``LabeledImageDataset`` (full decode to float32 CHW) plus
    crop/resize/flip/normalize on that float array as Chainer's ImageNet
    example and ChainerCV do;
  - ``chainer_mpiter`` (pipeline only): ``MultiprocessIterator`` calling
    hpcsgd's own per-image function, so the ratio isolates the pipeline
    (shared-memory slots vs pickled examples + ``concat_examples``);
* the fraction of step time the trainer waits for data when the step is a
  synthetic compute of fixed duration (a sleep: compute that is off the CPU,
  as on a GPU), 2 workers.

Throughputs are steady-state (after a warm-up epoch), medians of repeats; the
machine's load average is recorded. ``--quick`` runs a small version.

    python benchmarks/loader.py [--quick] [--cache DIR] [--out benchmarks/results/loader.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._machine import machine  # noqa: E402
from hpcsgd.data import Loader, Normalize, RandomResizedCrop, ResizeCenterCrop, build_dataset  # noqa: E402
from hpcsgd.data.jpeg import simplejpeg  # noqa: E402
from hpcsgd.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def generate(cache: str, n: int, classes: int = 10) -> str:
    """``cache/train/c<k>/<i>.JPEG``: n textured 500x375 quality-90 JPEGs (made once)."""
    root = os.path.join(cache, f"imagenet-like-{n}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n):
        d = os.path.join(root, "train", f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        img = np.empty((375, 500, 3), np.float32)
        for c in range(3):
            f = rng.uniform(0.5, 4.0, 2)
            img[:, :, c] = 128 + 90 * np.sin(f[0] * xx / 80 + rng.uniform(0, 6)) * np.cos(f[1] * yy / 60)
        img += rng.normal(0, 18, img.shape).astype(np.float32)  # texture: realistic file sizes
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.JPEG"),
                                                                   quality=90)
    open(done, "w").close()
    return root


class ChainerStandardExample:
    """The same transform written the standard Chainer way (the per-example baseline).

    ``chainer.datasets.LabeledImageDataset`` reads each file as Chainer does
    (Pillow full decode to a float32 CHW array), then the same random-resized
    crop (same box distribution), flip and normalization are applied to that
    array as Chainer's ImageNet example and ChainerCV do: crop the float array,
    resize it with Pillow's bilinear filter per channel in float mode (ChainerCV's
    ``transforms.resize`` without OpenCV), flip, ``(x - mean) / std``.
    """

    def __init__(self, paths, labels):
        import chainer

        self.base = chainer.datasets.LabeledImageDataset(list(zip(paths, labels)))
        self.crop = RandomResizedCrop(224)
        self.mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
        self.std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        img, label = self.base[i]  # float32 (C, H, W)
        rng = np.random.default_rng()
        x0, y0, x1, y1 = self.crop.box(img.shape[2], img.shape[1], rng)
        img = img[:, y0:y1, x0:x1]
        img = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch)).resize(
            (224, 224), Image.BILINEAR)) for ch in img])
        if rng.random() < 0.5:
            img = img[:, :, ::-1]
        return (img - self.mean) / self.std, label


class ChainerExample:
    """The per-example work of the same transform, as a Chainer dataset (for MultiprocessIterator)."""

    def __init__(self, paths, labels, **transform_kw):
        self.paths, self.labels = paths, labels
        self.transform = RandomResizedCrop(224, **transform_kw)
        self.norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        out = np.empty((3, 224, 224), np.float32)  # hpcsgd's per-image code, as the Loader runs it
        self.transform.write_into(self.paths[i], np.random.default_rng(), self.norm, out)
        return out, np.int32(self.labels[i])


def children_cpu_seconds() -> float:
    """User+system CPU seconds of this process's live child processes (from /proc)."""
    me, tick, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields[1] is ppid; utime, stime are fields[11], fields[12]
            total += int(fields[11]) + int(fields[12])
    return total / tick


def time_epochs(make_iter, n_images: int, batch: int, epochs: int, warmup: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over ``epochs`` epochs after ``warmup`` batches (startup excluded).

    CPU counts the workers and the consuming process; it is robust to other
    load on the machine, wall-clock images/s is not.
    """
    it = make_iter()
    for _ in range(warmup):
        next(it)
    batches = epochs * (n_images // batch)
    c0, p0, t0 = children_cpu_seconds(), time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - t0
    cpu = children_cpu_seconds() - c0 + time.process_time() - p0
    return batches * batch / wall, 1e3 * cpu / (batches * batch)


def loader_iter(ds, batch, workers, **transform_kw):
    loader = Loader(ds, batch, workers=workers, prefetch=2 * workers, seed=1,
                    transform=RandomResizedCrop(224, **transform_kw))

    def gen():
        while True:
            yield from loader
    return gen(), loader


def chainer_iter(ds, batch, workers, standard=False, **transform_kw):
    import chainer

    base = ChainerStandardExample(ds.paths, ds.labels) if standard else ChainerExample(
        ds.paths, ds.labels, **transform_kw)
    it = chainer.iterators.MultiprocessIterator(base, batch, repeat=True, shuffle=True, n_processes=workers,
                                                n_prefetch=2, shared_mem=3 * 224 * 224 * 4 + 64)

    def gen():
        while True:
            yield chainer.dataset.concat_examples(it.next())
    return gen(), it


def per_image_cpu_ms(paths, transform, reps: int) -> float:
    """Median over repeats of the CPU ms per image of ``transform`` in this process."""
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(reps):
        t0 = time.process_time()
        for p in paths:
            transform(p, rng)
        runs.append(1e3 * (time.process_time() - t0) / len(paths))
    return statistics.median(runs)


def generate_large(cache: str, n: int = 8) -> list[str]:
    """A few 1024x768 JPEGs, where the reduced-size decode applies to the eval transform."""
    d = os.path.join(cache, "large")
    os.makedirs(d, exist_ok=True)
    paths = [os.path.join(d, f"{i}.JPEG") for i in range(n)]
    rng = np.random.default_rng(1)
    for p in paths:
        if not os.path.exists(p):
            img = rng.normal(128, 40, (768, 1024, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).resize((1024, 768)).save(p, quality=90)
    return paths


def per_image_ms(paths, draft: bool, reps: int) -> float:
    t = RandomResizedCrop(224, draft=draft)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(reps):
        for p in paths:
            t0 = time.perf_counter()
            t(p, rng)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def data_wait_fraction(ds, batch, workers, step_s, steps):
    """Trainer wait per step with a fixed-duration compute step: (steady fraction, all-steps fraction,
    median step s, per-step waits). Steady state skips the first ``prefetch`` steps (queue filling)."""
    prefetch = 2 * workers
    loader = Loader(ds, batch, workers=workers, prefetch=prefetch, seed=2, transform="train",
                    copy=False)  # as `hpcsgd train` runs it: zero-copy views of the shared slots
    waits, t_steps = [], []
    try:
        it = iter(loader)
        next(it)  # startup
        for _ in range(steps + prefetch):
            t0 = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)
            waits.append(loader.last_wait_seconds)
            time.sleep(step_s)  # the synthetic compute step (off-CPU, as on an accelerator)
            t_steps.append(time.perf_counter() - t0)
    finally:
        loader.close()
    steady = sum(waits[prefetch:]) / sum(t_steps[prefetch:])
    return steady, sum(waits) / sum(t_steps), statistics.median(t_steps), waits


def decode_costs(ds, large: list, reps: int) -> dict:
    """CPU ms per image of each decode + transform path, in this process (32 images, median of ``reps``)."""
    sample = ds.paths[:32]
    micro = {}
    fused_norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    slot, crop = np.empty((3, 224, 224), np.float32), RandomResizedCrop(224)
    micro["train_fused_write_into"] = per_image_cpu_ms(
        sample, lambda p, rng: crop.write_into(p, rng, fused_norm, slot), reps)
    micro["train_pillow_resize_then_normalize"] = per_image_cpu_ms(
        sample, lambda p, rng: fused_norm.write(crop(p, rng), slot), reps)
    for name, paths, t in [
            ("train_pillow_full", sample, RandomResizedCrop(224, draft=False, decoder="pillow")),
            ("train_pillow_draft", sample, RandomResizedCrop(224, draft=True, decoder="pillow")),
            ("eval_1024x768_pillow_full", large, ResizeCenterCrop(256, 224, draft=False, decoder="pillow")),
            ("eval_1024x768_pillow_draft", large, ResizeCenterCrop(256, 224, draft=True, decoder="pillow"))]:
        micro[name] = per_image_cpu_ms(paths, t, reps)
    standard = ChainerStandardExample(ds.paths[:32], ds.labels[:32])
    micro["train_chainer_standard"] = per_image_cpu_ms(range(len(standard)), lambda i, rng: standard[i], reps)
    if simplejpeg is not None:
        micro["train_simplejpeg"] = per_image_cpu_ms(sample, RandomResizedCrop(224, decoder="simplejpeg"),
                                                     reps)
        micro["eval_1024x768_simplejpeg_draft"] = per_image_cpu_ms(
            large, ResizeCenterCrop(256, 224, decoder="simplejpeg"), reps)
    print("CPU ms per image, decode + transform, 1 process:",
          ", ".join(f"{k} {v:.2f}" for k, v in micro.items()), flush=True)
    return micro


def loader_throughput(ds, batch: int, workers: list, repeats: int, epochs: int) -> tuple[dict, dict]:
    """images/s and CPU ms per image of each loader variant: ``{variant: {workers: [per repeat]}}`` twice."""
    variants = {"hpcsgd": (loader_iter, {"decoder": "pillow"}),
                "chainer_standard": (chainer_iter, {"standard": True}),
                "chainer_mpiter": (chainer_iter, {"decoder": "pillow"})}
    if simplejpeg is not None:
        variants["hpcsgd_simplejpeg"] = (loader_iter, {"decoder": "simplejpeg"})
        variants["chainer_mpiter_simplejpeg"] = (chainer_iter, {"decoder": "simplejpeg"})
    throughput: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    cpu_ms: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    for w in workers:
        for rep in range(repeats):
            for name, (make, kw) in variants.items():
                holder = {}

                def make_iter(make=make, kw=kw, holder=holder, w=w):
                    gen, obj = make(ds, batch, w, **kw)
                    holder["obj"] = obj
                    return gen
                try:
                    ips, cpu = time_epochs(make_iter, len(ds), batch, epochs, warmup=2 * w)
                finally:
                    if "obj" in holder:
                        (holder["obj"].close if hasattr(holder["obj"], "close") else holder["obj"].finalize)()
                throughput[name].setdefault(str(w), []).append(ips)
                cpu_ms[name].setdefault(str(w), []).append(cpu)
                print(f"workers={w} rep={rep} {name:22s} {ips:7.1f} images/s {cpu:6.2f} CPU ms/image "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return throughput, cpu_ms


def _ratios(med: dict, med_cpu: dict) -> dict:
    """hpcsgd's loader against Chainer's iterators, per worker count (images/s and CPU per image)."""
    ratios = {}
    for w in med["hpcsgd"]:
        std, std_cpu = med["chainer_standard"][w], med_cpu["chainer_standard"][w]
        ratios[w] = {"images_per_s_vs_chainer_standard": med["hpcsgd"][w] / std,
                     "cpu_per_image_vs_chainer_standard": std_cpu / med_cpu["hpcsgd"][w],
                     "images_per_s_vs_chainer": med["hpcsgd"][w] / med["chainer_mpiter"][w],
                     "cpu_per_image_vs_chainer": med_cpu["chainer_mpiter"][w] / med_cpu["hpcsgd"][w]}
        if "hpcsgd_simplejpeg" in med:
            ratios[w]["images_per_s_simplejpeg_vs_chainer"] = (
                med["hpcsgd_simplejpeg"][w] / med["chainer_mpiter"][w])
            ratios[w]["images_per_s_simplejpeg_vs_chainer_simplejpeg"] = (
                med["hpcsgd_simplejpeg"][w] / med["chainer_mpiter_simplejpeg"][w])
            ratios[w]["cpu_per_image_simplejpeg_vs_chainer"] = (
                med_cpu["chainer_mpiter"][w] / med_cpu["hpcsgd_simplejpeg"][w])
    return ratios


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (fewer images, one repeat)")
    ap.add_argument("--cache", default=os.environ.get(
        "HPCSGD_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "hpcsgd-bench-cache")))
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "loader.json"))
    args = ap.parse_args(argv)
    args.images = args.images or (128 if args.quick else 320)
    if args.images < args.batch:  # an epoch of no batch: the timed loops would wait forever
        ap.error(f"--images {args.images} holds no batch of --batch {args.batch}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    n_images = args.images
    repeats = args.repeats or (1 if args.quick else 3)
    epochs = 1
    load_before = os.getloadavg()
    root = generate(args.cache, n_images)
    ds = build_dataset("imagenet_folder", root, split="train")
    sizes = [os.path.getsize(p) for p in ds.paths]
    print(f"{len(ds)} JPEGs 500x375 q90, mean {np.mean(sizes) / 1e3:.0f} kB, in {root}", flush=True)

    micro = decode_costs(ds, generate_large(args.cache), 2 if args.quick else 5)
    throughput, cpu_ms = loader_throughput(ds, args.batch, args.workers, repeats, epochs)
    med = {name: {w: statistics.median(v) for w, v in d.items()} for name, d in throughput.items()}
    med_cpu = {name: {w: statistics.median(v) for w, v in d.items()} for name, d in cpu_ms.items()}
    ratios = _ratios(med, med_cpu)

    wait = _data_wait(ds, args, med)
    result = {
        "benchmark": "loader", "quick": args.quick, "images": len(ds), "image_size": [500, 375],
        "jpeg_quality": 90, "mean_file_kB": float(np.mean(sizes) / 1e3), "batch": args.batch,
        "transform": "RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3) + flip + normalize -> float32 NCHW",
        "repeats": repeats, "epochs_timed": epochs, "throughput_images_per_s": throughput,
        "median_images_per_s": med, "cpu_ms_per_image": cpu_ms, "median_cpu_ms_per_image": med_cpu,
        "ratios": ratios, "per_image_decode_augment": micro,
        "data_wait": wait, "loadavg_before": load_before, **_environment(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps({"ratios": ratios, "data_wait_fraction": wait["wait_fraction"]}, indent=1))
    return 0


def _data_wait(ds, args, med: dict) -> dict:
    """The loader's data wait under a compute-bound step (twice what the workers need per batch)."""
    w_max = max(args.workers)
    step_s = 2.0 * args.batch / med["hpcsgd"][str(w_max)]
    frac, frac_all, step_med, waits = data_wait_fraction(ds, args.batch, w_max, step_s,
                                                         12 if args.quick else 30)
    print(f"data wait: {100 * frac:.2f}% of step time in steady state, {100 * frac_all:.2f}% with the "
          f"queue filling (step {step_med * 1e3:.0f} ms = synthetic compute {step_s * 1e3:.0f} ms, "
          f"{w_max} workers)", flush=True)
    return {"workers": w_max, "synthetic_compute_s": step_s, "median_step_s": step_med,
            "wait_fraction": frac, "wait_fraction_incl_queue_fill": frac_all,
            "wait_s_per_step": waits, "compute": "sleep (off-CPU, like an accelerator step)"}


def _environment() -> dict:
    """Load after the run, the machine, and the versions of what decodes and computes."""
    import PIL
    from threadpoolctl import threadpool_info

    return {
        "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(), "machine": machine(),
        "python": platform.python_version(), "pillow": PIL.__version__,
        "decoder": "simplejpeg " + simplejpeg.__version__ if simplejpeg is not None else "pillow",
        "blas": [{k: i.get(k) for k in ("internal_api", "version", "architecture")}
                 for i in threadpool_info()],
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = result["median_images_per_s"]
    names = list(med)
    workers = sorted(med[names[0]], key=int)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(workers))], [med[name][w] for w in workers], width,
               label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workers))])
    ax.set_xticklabels([f"{w} worker(s)" for w in workers])
    ax.set_ylabel("images/s (median)")
    ax.set_title(f"train transform, 500x375 JPEG -> 224, batch {result['batch']}; "
                 f"load {result['loadavg_before'][0]:.1f}")
    ax.legend(fontsize=8)
    micro = result["per_image_decode_augment"]
    ax2.barh(list(micro), list(micro.values()), color=[f"C{i}" for i in range(len(micro))])
    ax2.set_xlabel("CPU ms per image (1 process)")
    ax2.set_title("decode + transform")
    ax2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
