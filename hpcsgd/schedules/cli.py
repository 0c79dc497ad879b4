"""``hpcsgd schedule``: print (or plot) a recipe's LR schedule before spending a cluster on it.

    hpcsgd schedule --recipe akiba --global-batch 32768 --epochs 90 --iters-per-epoch 39
    hpcsgd schedule --recipe goyal --global-batch 8192 --epochs 90 --iters-per-epoch 156 --json
    hpcsgd schedule --recipe lars --global-batch 32768 --epochs 90 --iters-per-epoch 39 --plot lars.png
    hpcsgd schedule --recipe goyal --global-batch 1024 --epochs 9 --iters-per-epoch 58 --set warmup_epochs=2

Prints the hyperparameters at each epoch boundary (the value used by the
first iteration of that epoch): LR, and alpha_SGD / alpha_RMSprop for akiba.
Never imports mpi4py.
"""

from __future__ import annotations

import argparse
import json
import math

import yaml

from hpcsgd.errors import ConfigError
from hpcsgd.schedules.recipes import build_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, choices=("goyal", "akiba", "lars", "sgd"))
    parser.add_argument("--global-batch", type=int, required=True, help="images per update over all ranks")
    parser.add_argument("--epochs", type=float, default=90.0, help="training epochs (default 90)")
    parser.add_argument("--iters-per-epoch", type=int, default=None,
                        help="iterations per epoch (default: ceil(1,281,167 / global batch), ImageNet-1k)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. lr=2.9 or milestones=[30,60,80] (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of the per-iteration schedule")


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def boundary_rows(recipe) -> list[dict]:
    """Hyperparameters at each epoch boundary 0, 1, ..., floor(epochs)."""
    rows = []
    for e in range(int(math.floor(recipe.epochs)) + 1):
        row = {"epoch": e, "iteration": e * recipe.iters_per_epoch}
        row.update(recipe.hyperparams(float(e)))
        rows.append(row)
    return rows


def _plot(recipe, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(math.ceil(recipe.epochs * recipe.iters_per_epoch))
    step = max(1, n // 4000)
    its = list(range(0, n, step))
    epochs = [recipe.epoch_of(i) for i in its]
    hps = [recipe.hyperparams(e) for e in epochs]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(epochs, [h["lr"] for h in hps], label="learning rate")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_yscale("log" if recipe.name == "akiba" else "linear")
    if "alpha_sgd" in hps[0]:
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["alpha_sgd"] for h in hps], color="tab:orange", label="alpha_SGD")
        ax2.set_ylabel("alpha_SGD")
        ax2.set_ylim(0, 1.05)
    ax.set_title(f"recipe {recipe.name}: global batch {recipe.global_batch}, {recipe.epochs:g} epochs, "
                 f"{recipe.iters_per_epoch} it/epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except BrokenPipeError:  # e.g. piped into `head`
        return 0


def _main(args: argparse.Namespace) -> int:
    ipe = args.iters_per_epoch or int(math.ceil(1281167 / args.global_batch))
    try:
        recipe = build_recipe(args.recipe, None, args.global_batch, args.epochs, ipe, **_overrides(args.set))
    except ConfigError as e:
        print(f"hpcsgd schedule: {e}")
        return 2
    rows = boundary_rows(recipe)
    if args.json:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.settings.items()}
        print(json.dumps({"recipe": recipe.name, "global_batch": recipe.global_batch, "epochs": recipe.epochs,
                          "iters_per_epoch": ipe, "settings": settings, "boundaries": rows}, indent=1))
    else:
        keys = [k for k in rows[0] if k not in ("epoch", "iteration")]
        print(f"# recipe {recipe.name}: global batch {recipe.global_batch}, {recipe.epochs:g} epochs, "
              f"{ipe} iterations/epoch, epoch scale x{recipe.settings['epoch_scale']:g}")
        print(f"{'epoch':>6} {'iteration':>10} " + " ".join(f"{k:>14}" for k in keys))
        for r in rows:
            print(f"{r['epoch']:>6} {r['iteration']:>10} " + " ".join(f"{r[k]:>14.6g}" for k in keys))
    if args.plot:
        _plot(recipe, args.plot)
        if not args.json:
            print(f"# plot written to {args.plot}")
    return 0
