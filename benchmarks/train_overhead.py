"""What ``hpcsgd train`` adds to the bare model step: one Run, both steps interleaved, CPU time.

    mpiexec -n 1 python benchmarks/train_overhead.py                       # trainer vs bare step
    mpiexec -n 2 python benchmarks/train_overhead.py [--set KEY=VALUE ...] # + gradient mean parts

Why: profiles of the whole training step (cProfile) multiply Chainer's and the trainer's Python
several times over, and under mpiexec they charge a rank's wait for the slower rank to whatever
collective comes first. This builds the main job's Run (``jobs/configs/fashion_mnist.yaml``
with ``--set`` overrides) and alternates, 3 steps at a time, the trainer's own ``Run.step()``
(loader, loss, tracer, noise scale, gradient mean, update) with a bare step on the same model
(cleargrads, forward, loss, backward, the recipe's optimizer update on one fixed batch). It
prints the medians of process CPU time per step (ms). With 2 ranks it also times the parts of
the gradient mean and the noise scale after a double barrier, i.e. their own cost without the
other rank's lateness, which the trainer step's median includes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import chainer.functions as F

from hpcsgd.train import config as C
from hpcsgd.train.build import build_run


def median_ms(fn, n: int, sync=None) -> float:
    fn()
    times = []
    for _ in range(n):
        if sync is not None:
            sync()
            sync()
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="jobs/configs/fashion_mnist.yaml")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=12, help="rounds of 3 trainer + 3 bare steps")
    args = ap.parse_args()
    from mpi4py import MPI

    size = MPI.COMM_WORLD.size
    overrides = ["progress=false", "checkpoint_interval=0"] + args.overrides
    cfg = C.resolve(C.merge(C.load_yaml(args.config), overrides), size, check_paths=True)
    with tempfile.TemporaryDirectory() as out:
        run = build_run(cfg, out)
        try:
            report(run, args.rounds)
        finally:
            run.close()


def report(run, rounds: int) -> None:
    x, t = (a.copy() for a in next(iter(run.loader)))
    model, opt, comm = run.model, run.recipe.optimizer, run.comm

    def bare():
        model.cleargrads()
        F.softmax_cross_entropy(model(x), t).backward()
        opt.update()

    bare_ms, train_ms = [], []
    for _ in range(3):
        bare()
        run.step()
    for _ in range(rounds):
        for fn, acc in ((bare, bare_ms), (run.step, train_ms)):
            for _ in range(3):
                t0 = time.process_time()
                fn()
                acc.append(time.process_time() - t0)
    lines = [f"bare model step {1e3 * statistics.median(bare_ms):.1f} ms, trainer step "
             f"{1e3 * statistics.median(train_ms):.1f} ms (medians of {len(bare_ms)}, process CPU time)"]
    if comm.size > 1:
        model.cleargrads()
        F.softmax_cross_entropy(model(x), t).backward()
        sync = comm.mpi_comm.Barrier
        parts = {"gradient mean (all of it)": lambda: comm.multi_node_mean_grad(model, True),
                 "  of which the parameter check": lambda: comm.check_params_consistent(model, False),
                 "  of which check + selection + layout + bind": lambda: comm.grad_reducer(model, True)}
        if run.noise is not None:
            parts["noise scale, local norms"] = lambda: run.noise.local.after_backward(0, 1)
        parts["optimizer update"] = opt.update
        lines += [f"  {median_ms(fn, 40, sync):6.3f} ms  {name}" for name, fn in parts.items()]
    if comm.rank == 0:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
