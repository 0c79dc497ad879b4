"""``hpcsgd train``: parse and validate the config on every rank, then dry-run or train.

    mpiexec -n 2 hpcsgd train jobs/configs/fashion_mnist.yaml --out runs/fmnist
    python -m hpcsgd train CONFIG.yaml --set epochs=2 --set batch_per_rank=64 --out DIR
    hpcsgd train jobs/configs/akiba32k.yaml --dry-run --world-size 1024 --ranks-per-node 8

The config is validated from the file alone (the world size is a local MPI
query), so a bad config exits with status 2 on every rank, message on rank 0,
before any collective. An exception during training prints the rank's
traceback and aborts the whole job (``MPI_Abort``), so no rank is left waiting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

from hpcsgd.errors import ConfigError, DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (keys: hpcsgd train --help-config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")
    p.add_argument("--out", default=None, help="output directory (logs, checkpoints, summary.json)")
    p.add_argument("--resume", default=None, metavar="DIR|auto",
                   help="resume from the newest good checkpoint in DIR, or in OUT/checkpoints ('auto')")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, topology and schedule, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: plan for this many ranks instead of the launched ones")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="with --dry-run --world-size: ranks per node of the planned job")
    p.add_argument("--format", choices=("text", "json"), default="text", help="--dry-run output format")
    p.add_argument("--timeline", default=None, metavar="FILE", help="write a Chrome-trace timeline")
    p.add_argument("--timeline-iters", default="0:20", metavar="A:B",
                   help="iterations recorded in the timeline (default 0:20)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")


def _world() -> tuple[int, int]:
    """(rank, size) of MPI_COMM_WORLD: local queries, no communication."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def _select_blas() -> None:
    """Choose OPENBLAS_CORETYPE before numpy loads (hpcsgd.blas); rank 0 says when it set one."""
    from hpcsgd.blas import launcher_rank, select_coretype

    before = os.environ.get("OPENBLAS_CORETYPE")
    line = select_coretype()
    if line and os.environ.get("OPENBLAS_CORETYPE") != before and launcher_rank() in (None, 0):
        print(f"[hpcsgd] {line}", file=sys.stderr, flush=True)


def load_config(args, world_size: int, check_paths: bool = True) -> dict:
    from hpcsgd.train import config as C

    if not args.config:
        raise ConfigError("no config file given: hpcsgd train CONFIG.yaml (see --help-config)")
    return C.resolve(C.merge(C.load_yaml(args.config), args.overrides), world_size, check_paths=check_paths)


def main(args) -> int:
    from hpcsgd.train import config as C

    if args.help_config:
        print("config keys (key, default, meaning):\n" + C.describe())
        return 0
    _select_blas()
    planned = args.dry_run and args.world_size is not None
    rank, size = (0, args.world_size) if planned else _world()
    try:
        if args.world_size is not None and not args.dry_run:
            raise ConfigError("--world-size only plans a --dry-run; launch the ranks with mpiexec/srun")
        if not args.dry_run and not args.out:
            raise ConfigError("--out DIR is required")
        cfg = load_config(args, size, check_paths=not args.dry_run)
        from hpcsgd.train.custom_recipe import make_recipe

        try:  # recipe settings are checked here too: before any collective
            make_recipe(cfg, None, 1)
        except ConfigError as e:
            if cfg["recipe"] == "custom":
                raise
            raise ConfigError(f"config key 'recipe_options': {e}") from e
        if cfg["gpu"] and not args.dry_run:
            import importlib.util

            if importlib.util.find_spec("cupy") is None:
                raise ConfigError("config key 'gpu' is true but CuPy is not installed "
                                  "(pip install 'hpcsgd[gpu]'), or set gpu: false")
        timeline_iters = _iter_range(args.timeline_iters)
    except ConfigError as e:
        if rank == 0:
            print(f"hpcsgd train: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg, args, planned)
    return _run_or_abort(cfg, args, timeline_iters, rank, size)


def _iter_range(text: str) -> range:
    from hpcsgd.trace import parse_iter_range

    try:
        return parse_iter_range(text)
    except ValueError as e:
        raise ConfigError(f"--timeline-iters {text!r}: expected A:B ({e})") from e


def _run_or_abort(cfg: dict, args, timeline_iters: range, rank: int, size: int) -> int:
    import hpcsgd.abort
    import hpcsgd.watchdog
    from hpcsgd.train.loop import train

    hpcsgd.abort.install()  # an uncaught exception in any thread aborts the whole job
    # Collective watchdog ($HPCSGD_COLLECTIVE_TIMEOUT, default 600 s; 0: off); its board of
    # per-rank states lives in the output directory, which every node sees when checkpoints do.
    hpcsgd.watchdog.install(board_dir=os.path.join(args.out, "watchdog"))
    try:
        summary = train(cfg, args.out, resume=args.resume, timeline=args.timeline,
                        timeline_iters=timeline_iters)
        hpcsgd.watchdog.uninstall()
    except Exception as e:
        sys.stdout.flush()
        code = 2 if isinstance(e, (ConfigError, DataError)) else 1  # 2: hpcsgd launch never restarts it
        if size > 1:  # print this rank's traceback, then MPI_Abort: no rank is left waiting
            from hpcsgd.abort import abort_job

            abort_job(f"training failed ({type(e).__name__}: {e}); aborting the MPI job",
                      (type(e), e, e.__traceback__), code=code)
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        sys.stderr.write(f"hpcsgd train: training failed:\n{text}")
        return code
    from hpcsgd.launch.markers import mark_done

    mark_done(args.out, summary["iterations"])  # results written, last collective done: MPI_Finalize next
    if rank == 0:
        if summary["top1"] is not None:
            print(f"final test accuracy: top-1 {100 * summary['top1']:.2f}%  "
                  f"top-5 {100 * summary['top5']:.2f}%  "
                  f"({summary['iterations']} iterations, {summary['epochs']:.2f} epochs, "
                  f"{summary['images_per_s']:.0f} images/s, {summary['wall_seconds']:.1f} s wall)")
        else:
            print(f"stopped at iteration {summary['iterations']} of {summary['total_iterations']} "
                  f"(checkpoint in {os.path.join(args.out, 'checkpoints')})")
    return 0


# -- dry run -----------------------------------------------------------------------------

def planned_topology(cfg: dict, world_size: int, ranks_per_node: int | None) -> dict:
    """Topology of a job that is not launched: nodes = ceil(world / ranks_per_node)."""
    rpn = ranks_per_node or int(os.environ.get("HPCSGD_RANKS_PER_NODE", 0) or world_size)
    if rpn < 1:
        raise ConfigError(f"--ranks-per-node must be >= 1, got {rpn}")
    return {"size": world_size, "nodes": math.ceil(world_size / rpn), "ranks_per_node": rpn,
            "uniform": world_size % rpn == 0, "gpus_per_node": rpn if cfg["gpu"] else 0, "planned": True}


def train_size(cfg: dict) -> tuple[int, str]:
    """(number of training samples, where it came from) without reading the data if need be."""
    from hpcsgd.train.config import KNOWN_SIZES

    if cfg["train_size"]:
        return cfg["train_size"], "config key train_size"
    if cfg["dataset"] == "synthetic":
        return int(cfg["dataset_options"].get("n", 0)) or 0, "dataset_options.n"
    try:
        from hpcsgd.data import build_dataset

        ds = build_dataset(cfg["dataset"], cfg["data_path"], split="train", **cfg["dataset_options"])
        return len(ds), "the dataset on disk"
    except Exception as e:
        if cfg["dataset"] in KNOWN_SIZES:
            return KNOWN_SIZES[cfg["dataset"]][0], f"known size (data not readable here: {type(e).__name__})"
        raise ConfigError(f"config key 'data_path': cannot read the dataset to plan ({e}); "
                          f"set train_size for a dry run") from e


def schedule_summary(cfg: dict, iters_per_epoch: int) -> list[dict]:
    """Recipe hyperparameters at a few epochs (no model needed)."""
    from hpcsgd.train.custom_recipe import make_recipe

    recipe = make_recipe(cfg, None, iters_per_epoch)
    e = float(cfg["epochs"])
    points = sorted({0.0, 1.0, 5.0, 10.0, 12.5, 30.0, 40.0, 60.0, 70.0, 80.0, 85.0, e * 0.5, e - 1e-9})
    return [{"epoch": round(p, 3), **{k: float(v) for k, v in recipe.hyperparams(p).items()}}
            for p in points if 0 <= p < e]


def dry_run(cfg: dict, args, planned: bool) -> int:
    from hpcsgd.train.config import dump

    if planned:
        topo, rank = planned_topology(cfg, args.world_size, args.ranks_per_node), 0
    else:
        from hpcsgd.topology import create_topology

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
