"""The gradient noise scale along the main job's batch-128 trajectory, against the reference table.

    python benchmarks/noise_scale.py                       # the whole table: epochs 0 .. 7.5 (one core)
    python benchmarks/noise_scale.py --epochs 0 0.1 0.5    # only some points
    python benchmarks/noise_scale.py --fc-init uniform     # classifier initialized as PyTorch's nn.Linear
    python benchmarks/noise_scale.py --quick               # a 1-minute smoke run on synthetic data

The trajectory: the main job's model (ResNet-8, width 8, ``bn_mode: running``)
on Fashion-MNIST (normalized, no augmentation), trained on one rank at batch
128 with momentum SGD (LR 0.05 constant, momentum 0.9, no weight decay).

At each measurement epoch the training is paused and hpcsgd's estimator
(:func:`hpcsgd.train.noise_scale.estimate`) measures B_noise exactly as the
reference did: 32 micro-batches of 128 (``B_small`` = 128) from their own
loader, each micro-batch's gradient by its own backward pass, their squared
norms averaged and the squared norm of their average (``B_big`` = 4096).
From the same gradients it also gives the jackknife standard error over the
micro-batches (``b_noise_jk_se``) and the estimate of a 1-rank, 2-micro-batch
``hpcsgd train`` run (``b_noise_pairs``: B_big = 256, norms averaged over the
16 pairs); ``--bn-eval`` measures the same micro-batches with BN in eval mode,
``--save-dir`` keeps the model at each point.
Nothing the measurement touches reaches the trajectory: the parameters are
not updated, the training loader and RNG are untouched, and the BN running
averages are restored afterwards. ``--repeats R`` measures R independent sets
of 32 micro-batches per point; their spread is the noise of one measurement.

Writes ``benchmarks/results/noise_scale.json`` and ``noise_scale.png`` (with
the reference values drawn in the same plot).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks._machine import machine  # noqa: E402

#: The reference table: (epoch range, B_noise range), measured outside hpcsgd on this trajectory.
REFERENCE = [((0.0, 0.0), (60, 60)), ((0.1, 2.0), (170, 400)), ((4.3, 4.3), (1000, 1000)),
             ((7.5, 7.5), (2300, 2300))]
DEFAULT_EPOCHS = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.3, 6.0, 7.5]


def config(args) -> dict:
    from hpcsgd.train import config as C

    raw = {
        "model": "resnet_small", "model_options": {"depth": 8, "width": 8}, "bn_mode": "running",
        "dataset": "fashion_mnist", "augment": False, "batch_per_rank": args.batch,
        "recipe": "custom", "optimizer": {"name": "momentum_sgd", "momentum": args.momentum,
                                          "weight_decay": args.weight_decay},
        "schedule": {"type": "constant", "lr": args.lr}, "epochs": max(max(args.epochs), 0.01),
        "communicator": "flat",
        "loader_workers": 0, "threads": args.threads, "eval_interval": 0, "progress": False,
        "seed": args.seed, "noise_scale": False,
    }
    if args.quick:
        raw.update(dataset="synthetic", dataset_options={"shape": [1, 28, 28], "n": 2048, "pool": 256})
    return C.resolve(C.merge(raw), world_size=1)


def micro_gradients(run, batches, train: bool = True) -> np.ndarray:
    """(micro, n_params) float64: each micro-batch's gradient at the current parameters, by its own backward.

    ``train=False`` evaluates BN with its running averages (eval mode) instead of the
    micro-batch's statistics. The parameters are not updated; BN running averages are restored.
    """
    import chainer
    import chainer.functions as F

    model = run.model
    saved = {(path, name): copy.deepcopy(getattr(link, name))  # BN running averages
             for path, link in model.namedlinks() for name in link._persistent}
    out = []
    with chainer.using_config("train", train):
        for x, t in batches:
            model.cleargrads()
            F.softmax_cross_entropy(model(x), t).backward()
            out.append(np.concatenate([p.grad.ravel() for _, p in sorted(model.namedparams())]))
    links = dict(model.namedlinks())
    for (path, name), value in saved.items():
        setattr(links[path], name, value)
    model.cleargrads()
    return np.asarray(out, np.float64)


def estimates(g: np.ndarray, b: int) -> dict:
    """B_noise from per-micro-batch gradients ``g`` (micro, n) of ``b`` images each, three ways.

    ``b_noise``: the reference protocol (B_small = b, B_big = micro x b, one big gradient);
    ``b_noise_jk_se``: its jackknife standard error over the micro-batches;
    ``b_noise_pairs``: the in-training estimator of a 1-rank, 2-micro-batch run (B_big = 2b),
    the ratio of the estimates from the norms averaged over the micro // 2 pairs.
    """
    from hpcsgd.train.noise_scale import estimate, ratio

    n = len(g)
    sq = np.einsum("ij,ij->i", g, g)
    total = g.sum(0)
    small, mean = sq.mean(), total / n
    g2, tr = estimate(small, float(mean @ mean), b, b * n)
    loo = []
    for j in range(n):
        m = (total - g[j]) / (n - 1)
        g2j, trj = estimate((sq.sum() - sq[j]) / (n - 1), float(m @ m), b, b * (n - 1))
        loo.append(trj / g2j)
    loo = np.asarray(loo)
    pairs = (g[0:n - n % 2:2] + g[1:n - n % 2:2]) / 2
    g2p, trp = estimate(small, float(np.einsum("ij,ij->i", pairs, pairs).mean()), b, 2 * b)
    se = float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
    return {"b_noise": ratio(tr, g2), "grad_sq": g2, "trace_sigma": tr, "small_sq": small,
            "big_sq": float(mean @ mean), "b_noise_jk_se": se,
            "b_noise_pairs": ratio(trp, g2p), "grad_sq_pairs": g2p, "trace_sigma_pairs": trp}


def measure(run, stream, micro: int, bn_eval: bool = False) -> dict:
    """One B_noise measurement at the current parameters from ``micro`` micro-batches of ``stream``.

    Each micro-batch's gradient comes from its own backward pass (the same values as
    :class:`DriverLocalNorms`' differences, tested in tests/test_noise_scale.py).
    ``bn_eval``: also measure the same micro-batches with BN in eval mode (``*_bn_eval``).
    """
    b = run.cfg["batch_per_rank"]
    batches = [next(stream) for _ in range(micro)]
    out = estimates(micro_gradients(run, batches), b)
    if bn_eval:
        ev = estimates(micro_gradients(run, batches, train=False), b)
        out.update({f"{k}_bn_eval": v for k, v in ev.items() if k in ("b_noise", "grad_sq", "trace_sigma",
                                                                        "b_noise_jk_se")})
    return out


def save_checkpoint(run, path: str) -> None:
    """The parameters and BN averages at this point (npz), to remeasure without retraining."""
    import chainer

    chainer.serializers.save_npz(path, run.model)


def use_uniform_classifier_init() -> None:
    """Initialize the classifier as PyTorch's nn.Linear does: W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    B_noise at initialization depends on the initial logits' scale: hpcsgd's N(0, 0.01)
    classifier starts with logits near zero, a small mean gradient and a large B_noise.
    """
    import chainer
    import chainer.links as L

    import hpcsgd.models.resnet_small as resnet_small

    def fc_layer(in_size, n_classes):
        bound = in_size ** -0.5
        return L.Linear(in_size, n_classes, initialW=chainer.initializers.Uniform(bound),
                        initial_bias=chainer.initializers.Uniform(bound))

    resnet_small.fc_layer = fc_layer


def use_pytorch_default_init() -> None:
    """Initialize every layer as PyTorch's defaults do: conv and classifier weights U(+-1/sqrt(fan_in)).

    PyTorch's ``nn.Conv2d`` uses kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)), where
    hpcsgd uses He normal (fan_out); BN starts at gamma = 1, beta = 0 in both.
    """
    import chainer

    import hpcsgd.models.blocks as blocks

    use_uniform_classifier_init()
    blocks.he_normal = lambda: chainer.initializers.LeCunUniform(scale=3 ** -0.5)


def endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, nargs="+", default=DEFAULT_EPOCHS, help="measurement epochs")
    p.add_argument("--micro-batches", type=int, default=32,
                   help="micro-batches per measurement (B_big / B_small)")
    p.add_argument("--repeats", type=int, default=1, help="independent measurements per point")
    p.add_argument("--batch", type=int, default=128, help="training batch = B_small")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fc-init", choices=("hpcsgd", "uniform", "pytorch"), default="hpcsgd",
                   help="classifier init: hpcsgd's N(0, 0.01), or U(+-1/sqrt(fan_in)) (PyTorch's default); "
                        "pytorch: also the convolutions as PyTorch's default")
    p.add_argument("--bn-eval", action="store_true",
                   help="also measure with BN in eval mode (running averages)")
    p.add_argument("--save-dir", help="save the model (npz) at each measurement point here")
    p.add_argument("--quick", action="store_true", help="synthetic data, for a smoke test of the machinery")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "noise_scale.json"))
    args = p.parse_args(argv)
    if sorted(args.epochs) != args.epochs or args.epochs[0] < 0:
        p.error("--epochs must be ascending and >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import tempfile

    from hpcsgd.train.build import build_run, make_loader

    cfg = config(args)
    if args.fc_init == "uniform":
        use_uniform_classifier_init()
    elif args.fc_init == "pytorch":
        use_pytorch_default_init()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, tmp)
        probe_loader = make_loader(cfg, run.train_set, run.comm, run.device, "recompute")
        stream = endless(probe_loader)
        points = []
        try:
            for epoch in args.epochs:
                target = round(epoch * run.iters_per_epoch)
                losses = []
                while run.iteration < target:
                    losses.append(run.step())
                if args.save_dir:
                    os.makedirs(args.save_dir, exist_ok=True)
                    save_checkpoint(run, os.path.join(args.save_dir, f"iter{run.iteration:05d}.npz"))
                points.append(measure_point(run, stream, args, losses, t0))
                write(args, cfg, points)
        finally:
            probe_loader.close()
            run.close()
    return 0


def measure_point(run, stream, args, losses: list, t0: float) -> dict:
    """``args.repeats`` measurements at the run's current point, printed in one line; the point's record
    (``elapsed_s``: seconds since ``t0``, a ``time.perf_counter()`` reading, to the measurements' end)."""
    meas = [measure(run, stream, args.micro_batches, args.bn_eval) for _ in range(args.repeats)]
    bn = [m["b_noise"] for m in meas]
    shown = ", ".join("n/a" if x is None else f"{x:.0f}" for x in bn)
    extra = ", ".join(f"{k} {m[k]:.0f}" for m in meas for k in ("b_noise_jk_se", "b_noise_pairs",
                                                                 "b_noise_bn_eval")
                      if m.get(k) is not None)
    print(f"epoch {run.epoch():5.2f} (iteration {run.iteration:5d}): B_noise {shown} ({extra})", flush=True)
    return {"epoch": run.epoch(), "iteration": run.iteration, "measurements": meas, "b_noise": bn,
            "elapsed_s": time.perf_counter() - t0,
            "train_loss_since_last": float(np.mean(losses)) if losses else None}


def write(args, cfg, points) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    doc = {"what": "gradient noise scale B_noise along a batch-128 trajectory (hpcsgd.train.noise_scale)",
           "fc_init": args.fc_init,
           "b_small": args.batch, "b_big": args.batch * args.micro_batches, "command": command(sys.argv[1:]),
           "config": cfg, "reference": REFERENCE, "points": points, "machine": machine()}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    plot(points, args.out.rsplit(".", 1)[0] + ".png")


def command(argv: list[str]) -> str:
    """The command line that reproduces this file, without the machine-specific ``--out``."""
    keep, skip = [], False
    for a in argv:
        if skip or a == "--out" or a.startswith("--out="):
            skip = a == "--out"
            continue
        keep.append(a)
    return " ".join(["python benchmarks/noise_scale.py", *keep])


def plot(points, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (e0, e1), (b0, b1) in REFERENCE:
        if e0 == e1:
            ax.plot([e0], [b0], "ks", mfc="none", label="reference" if e0 == 0 else None)
        else:
            ax.add_patch(plt.Rectangle((e0, b0), e1 - e0, b1 - b0, fill=False, ls="--", ec="k"))
    xs = [(pt["epoch"], b) for pt in points for b in pt["b_noise"] if b is not None and b > 0]
    if xs:
        ax.plot(*zip(*xs), "C2o", label="hpcsgd (32 x 128)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("B_noise (images)")
    ax.set_yscale("log")
    ax.set_title("ResNet-8 (width 8), Fashion-MNIST, batch 128, LR 0.05")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
