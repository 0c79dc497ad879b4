"""Single-process step time of the README main job's model, for steering the small-conv kernels.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/small_step.py [--steps 20] [--profile]
    python benchmarks/small_step.py --layers        # per-convolution-layer table
    python benchmarks/small_step.py --kernels       # step time inside each numba kernel vs the rest

Why: ``hpcsgd train`` on the main job (ResNet-8 width 8, Fashion-MNIST 28x28x1, batch 128
per rank) spends its time in one rank's forward + backward + update; communication is
negligible at 78k parameters. This times exactly that step in one process (no MPI, random
seeded data, the Goyal recipe's optimizer as ``hpcsgd train`` builds it) with
``hpcsgd.kernels.enable(threads=1)``. It reports the median *process CPU time* per step (ms)
over ``--steps`` timed steps after 3 warm-up steps, and with ``--profile`` a cProfile summary.
``--layers`` times forward, backward-data and backward-weight of each distinct convolution
shape of the model (median ms of process CPU time per call, batch 128) for the hpcsgd kernel in
force (``--chainer`` for Chainer's own functions). ``--kernels`` splits the step, without a
profiler (cProfile inflates Chainer's Python several times over), into the process CPU time
inside each numba kernel (mean ms per step) and everything else: Chainer's graph, NumPy glue,
BLAS GEMMs of the stem/projection/linear layers, the loss and the optimizer.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import pkgutil
import pstats
import statistics
import time

import chainer
import chainer.functions as F
import numpy as np

import hpcsgd.kernels
from hpcsgd.models import build_model, ops
from hpcsgd.schedules import make_recipe

#: (Cin, Cout, k, stride, pad, H): the convolutions of ResNet-8 width 8 on 28x28x1 inputs.
LAYERS = [(1, 8, 3, 1, 1, 28), (8, 8, 3, 1, 1, 28), (8, 16, 3, 2, 1, 28), (16, 16, 3, 1, 1, 14),
          (8, 16, 1, 2, 0, 28), (16, 32, 3, 2, 1, 14), (32, 32, 3, 1, 1, 7), (16, 32, 1, 2, 0, 14)]


def build(batch: int):
    """Model, optimizer and seeded data for one rank of the main job."""
    np.random.seed(0)
    model = build_model("resnet_small", 10, in_channels=1, depth=8, width=8)
    cfg = {"recipe": "goyal", "recipe_options": {"lr": 0.4, "decay": "cosine"}, "global_batch": 2 * batch,
           "epochs": 3}
    recipe = make_recipe(cfg, model, 234)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, 10, batch).astype(np.int32)
    return model, recipe, x, t


def step(model, recipe, x, t) -> None:
    model.cleargrads()
    loss = F.softmax_cross_entropy(model(x), t)
    loss.backward()
    recipe.optimizer.update()


def time_steps(args) -> None:
    model, recipe, x, t = build(args.batch)
    recipe.on_iteration(0.5)
    for _ in range(3):
        step(model, recipe, x, t)
    times = []
    for _ in range(args.steps):
        t0 = time.process_time()
        step(model, recipe, x, t)
        times.append(time.process_time() - t0)
    print(f"step: median {1e3 * statistics.median(times):.1f} ms CPU, min {1e3 * min(times):.1f} ms "
          f"({args.steps} steps, batch {args.batch})")
    if args.profile:
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for _ in range(args.steps):
            step(model, recipe, x, t)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile_rows)


def time_kernels(args) -> None:
    """Mean process CPU ms per step inside each numba kernel of hpcsgd.kernels, and the rest."""
    import numba

    spent, calls = collections.Counter(), collections.Counter()

    def timed(name, fn):
        def run(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.process_time() - t0
                calls[name] += 1
        return run

    model, recipe, x, t = build(args.batch)
    step(model, recipe, x, t)  # compile first: a kernel that calls a wrapped kernel would not
    for info in pkgutil.iter_modules(hpcsgd.kernels.__path__):
        mod = importlib.import_module(f"hpcsgd.kernels.{info.name}")
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, numba.core.registry.CPUDispatcher):  # called via module globals
                setattr(mod, name, timed(f"{info.name}.{name}", obj))
    recipe.on_iteration(0.5)
    for _ in range(3):
        step(model, recipe, x, t)
    spent.clear()
    calls.clear()
    t0 = time.process_time()
    for _ in range(args.steps):
        step(model, recipe, x, t)
    total = 1e3 * (time.process_time() - t0) / args.steps
    inside = 1e3 * sum(spent.values()) / args.steps
    print(f"step: mean {total:.1f} ms CPU ({args.steps} steps, batch {args.batch}); numba kernels "
          f"{inside:.1f} ms, everything else {total - inside:.1f} ms")
    for name, sec in spent.most_common():
        print(f"  {1e3 * sec / args.steps:6.2f} ms  {calls[name] // args.steps:3d} calls/step  {name}")


def _median_cpu(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return 1e3 * statistics.median(ts)


def _layer_times(x, W, s: int, p: int, gy, repeats: int) -> tuple[float, float, float]:
    """Median ms of forward, and of the extra cost of the input and of the weight gradient."""

    def fwd():
        ops.conv2d(x, W, None, s, p)

    def grads(wrt):
        def run():
            chainer.grad([ops.conv2d(x, W, None, s, p)], wrt, grad_outputs=[gy])
        return run

    f = _median_cpu(fwd, repeats)
    return f, _median_cpu(grads([x]), repeats) - f, _median_cpu(grads([W]), repeats) - f


def time_layers(args) -> None:
    rng = np.random.default_rng(0)
    print(f"{'Cin':>4} {'Cout':>4} {'k':>2} {'s':>2} {'H':>3} {'fwd ms':>8} {'bwd-data':>9} {'bwd-W':>7}")
    for cin, cout, k, s, p, h in LAYERS:
        x = chainer.Variable(rng.standard_normal((args.batch, cin, h, h)).astype(np.float32))
        W = chainer.Variable(rng.standard_normal((cout, cin, k, k)).astype(np.float32))
        ho = (h + 2 * p - k) // s + 1
        gy = chainer.Variable(rng.standard_normal((args.batch, cout, ho, ho)).astype(np.float32))
        f, gd, gw = _layer_times(x, W, s, p, gy, args.repeats)
        print(f"{cin:>4} {cout:>4} {k:>2} {s:>2} {h:>3} {f:>8.2f} {gd:>9.2f} {gw:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=30)
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="time inside each numba kernel per step")
    ap.add_argument("--chainer", action="store_true", help="Chainer's functions instead of hpcsgd's kernels")
    ap.add_argument("--no-type-check", action="store_true", help="chainer.config.type_check = False")
    args = ap.parse_args()
    chainer.config.type_check = not args.no_type_check
    hpcsgd.kernels.enable(not args.chainer, threads=1)
    (time_layers if args.layers else time_kernels if args.kernels else time_steps)(args)


if __name__ == "__main__":
    main()
