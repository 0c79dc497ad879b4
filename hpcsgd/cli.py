"""``hpcsgd`` command line: one subcommand per module.

    hpcsgd train CONFIG.yaml [--set key=value ...] --out DIR   (under mpiexec)
    hpcsgd schedule --recipe akiba --global-batch 32768 --epochs 90 --iters-per-epoch 39
    hpcsgd predict --cluster mn1 --gpus 1024 --global-batch 32768 --epochs 90
    hpcsgd noise-scale CONFIG.yaml [--steps 200]              (B_noise probe; mpiexec optional)

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only
when their subcommand runs, so ``hpcsgd schedule`` never initialises MPI.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("hpcsgd.train.cli", "train a model data-parallel under mpiexec"),
    "launch": ("hpcsgd.launch.cli", "run `train` under mpiexec/srun, restarting it after a fault"),
    "schedule": ("hpcsgd.schedules.cli", "print or plot a learning-rate recipe"),
    "predict": ("hpcsgd.perfmodel.cli", "predict time-to-train on a cluster"),
    "noise-scale": ("hpcsgd.train.noise_probe", "probe: gradient noise scale, largest useful batch"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hpcsgd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    if argv and argv[0] in SUBCOMMANDS:
        # Import only the module of the chosen subcommand.
        name = argv[0]
        module = importlib.import_module(SUBCOMMANDS[name][0])
        p = sub.add_parser(name, help=SUBCOMMANDS[name][1])
        module.add_arguments(p)
        args = parser.parse_args(argv)
        return int(module.main(args) or 0)
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_)
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
