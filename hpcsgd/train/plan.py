"""``hpcsgd train --dry-run``: the plan of a job without running it.

    hpcsgd train jobs/configs/akiba32k.yaml --dry-run --world-size 1024 --ranks-per-node 8
    mpiexec -n 4 hpcsgd train CONFIG.yaml --dry-run --format json

Prints the resolved config, the topology (launched, or planned from
``--world-size``/``--ranks-per-node``), the batch arithmetic, the number of
iterations and the recipe's hyperparameters at a few epochs. Needs neither the
data (``train_size`` or the known ImageNet/Fashion-MNIST sizes stand in) nor a
launched job.
"""

from __future__ import annotations

import json
import math
import os
import sys

from hpcsgd.data import build_dataset
from hpcsgd.errors import ConfigError
from hpcsgd.schedules import make_recipe
from hpcsgd.train.config import KNOWN_SIZES, dump


def planned_topology(cfg: dict, world_size: int, ranks_per_node: int | None) -> dict:
    """Topology of a job that is not launched: nodes = ceil(world / ranks_per_node)."""
    rpn = ranks_per_node or int(os.environ.get("HPCSGD_RANKS_PER_NODE", 0) or world_size)
    if rpn < 1:
        raise ConfigError(f"--ranks-per-node must be >= 1, got {rpn}")
    return {"size": world_size, "nodes": math.ceil(world_size / rpn), "ranks_per_node": rpn,
            "uniform": world_size % rpn == 0, "gpus_per_node": rpn if cfg["gpu"] else 0, "planned": True}


def train_size(cfg: dict) -> tuple[int, str]:
    """(number of training samples, where it came from) without reading the data if need be."""
    if cfg["train_size"]:
        return cfg["train_size"], "config key train_size"
    if cfg["dataset"] == "synthetic":
        return int(cfg["dataset_options"].get("n", 0)) or 0, "dataset_options.n"
    try:
        ds = build_dataset(cfg["dataset"], cfg["data_path"], split="train", **cfg["dataset_options"])
        return len(ds), "the dataset on disk"
    except Exception as e:
        if cfg["dataset"] in KNOWN_SIZES:
            return KNOWN_SIZES[cfg["dataset"]][0], f"known size (data not readable here: {type(e).__name__})"
        raise ConfigError(f"config key 'data_path': cannot read the dataset to plan ({e}); "
                          f"set train_size for a dry run") from e


def schedule_summary(cfg: dict, iters_per_epoch: int) -> list[dict]:
    """Recipe hyperparameters at a few epochs (no model needed)."""
    recipe = make_recipe(cfg, None, iters_per_epoch)
    e = float(cfg["epochs"])
    points = sorted({0.0, 1.0, 5.0, 10.0, 12.5, 30.0, 40.0, 60.0, 70.0, 80.0, 85.0, e * 0.5, e - 1e-9})
    return [{"epoch": round(p, 3), **{k: float(v) for k, v in recipe.hyperparams(p).items()}}
            for p in points if 0 <= p < e]


def dry_run(cfg: dict, args, planned: bool) -> int:
    """Print the plan on rank 0 (text or JSON); 2 if the data cannot hold one step."""
    if planned:
        topo, rank = planned_topology(cfg, args.world_size, args.ranks_per_node), 0
    else:
        from hpcsgd.runtime.topology import (
            create_topology,  # imports mpi4py: not for a planned (unlaunched) job
        )

        t = create_topology(ranks_per_node=args.ranks_per_node)
        topo, rank = dict(t.describe(), gpus_per_node=t.intra_size if cfg["gpu"] else 0), t.rank
    if rank != 0:
        return 0
    try:
        n, n_source = train_size(cfg)
        per_epoch = (n // (cfg["batch_per_rank"] * cfg["world_size"])) // cfg["grad_accumulation"]
        if per_epoch < 1:
            raise ConfigError(f"config key 'global_batch'={cfg['global_batch']} exceeds the {n} training "
                              f"samples ({n_source})")
        schedule = schedule_summary(cfg, per_epoch)
    except ConfigError as e:
        print(f"hpcsgd train: config error: {e}", file=sys.stderr)
        return 2
    missing = [k for k in ("data_path", "val_path") if cfg[k] and not os.path.exists(cfg[k])]
    plan = {
        "config": cfg, "topology": topo,
        "batch": {"global_batch": cfg["global_batch"], "ranks": cfg["world_size"],
                  "batch_per_rank": cfg["batch_per_rank"], "grad_accumulation": cfg["grad_accumulation"],
                  "formula": f"{cfg['world_size']} ranks x {cfg['batch_per_rank']} x "
                             f"{cfg['grad_accumulation']} = {cfg['global_batch']}"},
        "train_samples": n, "train_samples_from": n_source, "iters_per_epoch": per_epoch,
        "total_iterations": math.ceil(cfg["epochs"] * per_epoch), "schedule": schedule,
        "missing_paths": missing,
    }
    if args.format == "json":
        print(json.dumps(plan, indent=1))
        return 0
    print("# resolved config\n" + dump(cfg))
    print(f"# topology: {topo['size']} ranks on {topo['nodes']} node(s) x "
          f"{topo['ranks_per_node']} ranks/node, "
          f"{topo.get('gpus_per_node', 0)} GPU(s)/node{' (planned)' if planned else ''}")
    print(f"# batch: {plan['batch']['formula']} images per step; {n} training samples ({n_source}) -> "
          f"{per_epoch} iterations/epoch, {plan['total_iterations']} iterations for {cfg['epochs']} epochs")
    for k in missing:
        print(f"# warning: {k} {cfg[k]!r} does not exist on this machine (not checked for --dry-run)")
    print(f"# schedule ({cfg['recipe']}):")
    for row in schedule:
        print("#   epoch {:>7}: ".format(row["epoch"]) + ", ".join(
            f"{k}={v:.6g}" for k, v in row.items() if k != "epoch"))
    return 0
