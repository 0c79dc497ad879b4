"""float16 wire error on real ResNet-50 gradients at N = 8 .. 4096 simulated ranks, both schemes.

Why: the old float16 wire divides by the number of ranks before the cast, which
pushes small gradients into float16's subnormal range on large jobs. This
measures that on real gradients and puts the per-message power-of-two scale
('chunk', the default now) next to it, in the same run.

1. JPEG folder: ``--images`` Fashion-MNIST training images, upscaled to 224 px RGB
   (bicubic), written as JPEGs (quality 90) into a temporary ``train/<class>/``
   folder and read back through hpcsgd's JPEG pipeline (``imagenet_folder``,
   ``Loader`` with the training transform: random-resized crop to ``--px``, flip,
   normalisation).
2. ``K = --micro`` per-rank gradients: the real ResNet-50 (1000 classes, BatchNorm
   on batch statistics), one backward pass of the mean softmax cross-entropy over
   ``--batch`` images each, at initialisation; flat in sorted parameter-name order
   (the communicator's layout).
3. Simulated jobs: rank ``r`` holds gradient ``r % K`` (cyclic). The wire is
   replayed by :func:`hpcsgd.comm.fp16_model.simulate` (the hierarchical CPU
   algorithm: 8 ranks per node, float32 reduce-scatter in the node, float16
   between nodes with our pairwise reduce-scatter/allgather and float32
   accumulation, 16 MiB buckets), with the same kernels in the same order;
   ``N = 8`` is modelled as 8 nodes of one rank (the flat algorithm), since one
   node of 8 has no float16 stage. Reference: the float64 mean.
4. Gradients shrink as training goes on; ``--scales`` multiplies every gradient
   by 1, 0.1, 0.01 as a stated proxy for later steps. ``--max-per-param`` keeps only
   the first elements of each parameter (another stated proxy, for the cost).

Reported per scheme, N and scale: relative L2 error and the fraction of values
flushed to zero (zero where the float64 mean is not), over all parameters and per
parameter. JSON + plot into ``benchmarks/results/``.

    python benchmarks/fp16_wire.py                 # the full study (about 30 min of CPU)
    python benchmarks/fp16_wire.py --max-per-param 65536 --micro 8   # lighter: first 64k of each param
    python benchmarks/fp16_wire.py --quick         # smoke run: ResNet-18, 64 px, N <= 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._machine import machine  # noqa: E402
from hpcsgd.comm import fp16_model  # noqa: E402

SCHEMES = ("predivide", "chunk")


def make_jpeg_folder(root: str, n: int, seed: int = 0) -> str:
    """``n`` Fashion-MNIST images upscaled to 224 px RGB JPEGs under ``root/train/<class>/``."""
    from PIL import Image

    from hpcsgd.data import build_dataset

    fm = build_dataset("fashion_mnist", split="train")
    rng = np.random.default_rng(seed)
    for j, i in enumerate(rng.choice(len(fm.labels), n, replace=False)):
        folder = os.path.join(root, "train", f"class{int(fm.labels[i])}")
        os.makedirs(folder, exist_ok=True)
        gray = np.asarray(fm.images[i]).reshape(28, 28)
        img = Image.fromarray(gray, "L").resize((224, 224), Image.BICUBIC).convert("RGB")
        img.save(os.path.join(folder, f"img{j:04d}.JPEG"), quality=90)
    return root


def per_rank_gradients(root: str, model_name: str, k: int, batch: int, px: int, seed: int = 0):
    """``k`` flat float32 gradients (one micro-batch of ``batch`` images each) and the layout."""
    import chainer

    from hpcsgd.comm.packing import GradLayout, select_params
    from hpcsgd.data import Loader, RandomResizedCrop, build_dataset
    from hpcsgd.losses import softmax_cross_entropy
    from hpcsgd.models import build_model

    ds = build_dataset("imagenet_folder", root, "train")
    loader = Loader(ds, batch, seed=seed, workers=0, transform=RandomResizedCrop(size=px))
    np.random.seed(seed)
    model = build_model(model_name, 1000, bn_mode="batch")
    grads, layout = [], None
    t0 = time.perf_counter()
    batches = iter(loader)
    while len(grads) < k:
        try:
            x, t = next(batches)
        except StopIteration:  # the next epoch (the loader advances it)
            batches = iter(loader)
            continue
        model.cleargrads()
        with chainer.using_config("train", True):
            loss = softmax_cross_entropy(model(x), t)
        loss.backward()
        params = select_params(model, zero_fill=True)
        layout = layout or GradLayout.from_named(params)
        grads.append(np.concatenate([p.grad.reshape(-1) for _, p in params]).astype(np.float32))
        print(f"  gradient {len(grads)}/{k}: loss {float(loss.array):.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return grads, layout


def subsample(grads, layout, cap: int):
    """Keep the first ``cap`` elements of every parameter (a stated proxy that cuts the model's cost)."""
    from hpcsgd.comm.packing import GradLayout, Slot

    keep, slots, off = [], [], 0
    for s in layout.slots:
        n = min(s.size, cap)
        keep.append(np.arange(s.offset, s.offset + n))
        slots.append(Slot(s.name, (n,), s.dtype, off, n))
        off += n
    idx = np.concatenate(keep)
    return [np.ascontiguousarray(g[idx]) for g in grads], GradLayout(slots)


def study(grads, layout, ns, scales) -> list:
    """Error of both schemes vs the float64 mean, overall and per parameter, for every (scale, N)."""
    out = []
    for scale in scales:
        g = [(x * np.float32(scale)).astype(np.float32) for x in grads] if scale != 1 else grads
        for n in ns:
            ref = fp16_model.reference(g, n)
            rpn = 1 if n <= 8 else 8
            for scheme in SCHEMES:
                t0 = time.perf_counter()
                got = fp16_model.simulate(g, n, scheme, ranks_per_node=rpn)
                rec = {"scale": scale, "n": n, "ranks_per_node": rpn, "scheme": scheme,
                       "overall": fp16_model.error_stats(got, ref), "sim_seconds": time.perf_counter() - t0,
                       "per_layer": {"rel_l2": [], "flushed": []}}
                for s in layout.slots:
                    sl = slice(s.offset, s.offset + s.size)
                    st = fp16_model.error_stats(got[sl], ref[sl])
                    rec["per_layer"]["rel_l2"].append(st["rel_l2"])
                    rec["per_layer"]["flushed"].append(st["flushed"])
                o = rec["overall"]
                print(f"scale {scale:g} N={n:5d} {scheme:9s}: rel L2 {o['rel_l2']:.2e}  flushed "
                      f"{100 * o['flushed']:.2f}%  worst layer {max(rec['per_layer']['rel_l2']):.2e} "
                      f"({rec['sim_seconds']:.0f} s)", flush=True)
                out.append(rec)
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs, ns, scales = res["results"], res["config"]["ns"], res["config"]["scales"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"predivide": "tab:red", "chunk": "tab:blue"}
    styles = ["-", "--", ":"]
    for si, scale in enumerate(scales):
        for scheme in SCHEMES:
            rs = [r for r in recs if r["scale"] == scale and r["scheme"] == scheme]
            lab = f"{scheme}, grads x{scale:g}"
            ax[0].plot(ns, [np.median(r["per_layer"]["rel_l2"]) for r in rs], styles[si % 3],
                       color=colors[scheme], marker="o", label=lab)
            ax[0].fill_between(ns, [np.min(r["per_layer"]["rel_l2"]) for r in rs],
                               [np.max(r["per_layer"]["rel_l2"]) for r in rs], color=colors[scheme],
                               alpha=0.08)
            ax[2].plot(ns, [100 * r["overall"]["flushed"] for r in rs], styles[si % 3], color=colors[scheme],
                       marker="o", label=lab)
    big = max(ns)
    for scheme in SCHEMES:
        r = next(r for r in recs if r["scale"] == scales[0] and r["scheme"] == scheme and r["n"] == big)
        ax[1].semilogy(r["per_layer"]["rel_l2"], ".", color=colors[scheme], label=f"{scheme}, N={big}")
    ax[0].set(xscale="log", yscale="log", xlabel="simulated ranks N",
              ylabel="relative L2 error per parameter (median, band: min-max)")
    ax[1].set(xlabel="parameter index (sorted names)", ylabel="relative L2 error",
              title=f"per parameter at N={big}, grads x{scales[0]:g}")
    ax[2].set(xscale="log", xlabel="simulated ranks N", ylabel="% of all values flushed to zero")
    ax[2].set_yscale("symlog", linthresh=0.01)
    ax[2].set_ylim(bottom=0)
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"float16 wire vs float64 mean: {res['config']['model']} gradients "
                 f"({res['config']['micro']} micro-batches x {res['config']['batch']} images, "
                 f"{res['config']['px']} px)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--micro", type=int, default=16, help="per-rank gradients K (micro-batches)")
    p.add_argument("--batch", type=int, default=4, help="images per micro-batch")
    p.add_argument("--px", type=int, default=224, help="input size (crop) in pixels")
    p.add_argument("--images", type=int, default=256, help="JPEGs generated")
    p.add_argument("--ns", default="8,64,1024,4096", help="simulated job sizes")
    p.add_argument("--scales", default="1,0.1,0.01", help="gradient multipliers (later-training proxy)")
    p.add_argument("--max-per-param", type=int, default=0,
                   help="simulate only the first this many elements of each parameter (0: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: resnet18, 64 px, 4 x 2 images, N <= 64")
    p.add_argument("--out", default="benchmarks/results/fp16_wire.json")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.micro, a.batch, a.px, a.images, a.ns, a.scales = "resnet18", 4, 2, 64, 16, "8,64", "1"
        if a.out == p.get_default("out"):
            a.out = os.path.join(tempfile.gettempdir(), "fp16_wire_quick.json")
    ns = [int(x) for x in a.ns.split(",")]
    scales = [float(x) for x in a.scales.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpcsgd-fp16-") as root:
        make_jpeg_folder(root, a.images)
        grads, layout = per_rank_gradients(root, a.model, a.micro, a.batch, a.px)
    t_grads = time.perf_counter() - t0
    total = layout.total
    if a.max_per_param:
        grads, layout = subsample(grads, layout, a.max_per_param)
    res = {
        "config": {"model": a.model, "micro": a.micro, "batch": a.batch, "px": a.px, "images": a.images,
                   "ns": ns, "scales": scales, "assignment": "rank r holds per-rank gradient r % K",
                   "algorithm": "hierarchical, 8 ranks per node (N=8: 8 nodes x 1, flat), 16 MiB "
                                "buckets, float32 in the node, float16 between nodes (pairwise "
                                "reduce-scatter, float32 accumulation in node order, pairwise allgather)",
                   "flushed": "fraction of values that are 0 where the float64 mean is not",
                   "max_per_param": a.max_per_param, "elements_simulated": layout.total,
                   "elements_total": total},
        "layers": [{"name": s.name, "size": s.size} for s in layout.slots],
        "grad_rms": float(np.sqrt(np.mean(np.square(grads[0], dtype=np.float64)))),
        "gradient_seconds": t_grads,
        "machine": {**machine(), "platform": platform.platform()},
    }
    res["results"] = study(grads, layout, ns, scales)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.splitext(a.out)[0] + ".png")
    print(f"wrote {a.out} and the plot ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
