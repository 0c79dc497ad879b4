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
import importlib.util
import os
import sys
import traceback

# Nothing here may import NumPy: OPENBLAS_CORETYPE is chosen before it loads (hpcsgd.blas).
# Training and planning modules are imported once the config is known to be good.
from hpcsgd.blas import launcher_rank, select_coretype
from hpcsgd.errors import ConfigError, DataError
from hpcsgd.runtime.trace import parse_iter_range
from hpcsgd.train import config as C


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
    before = os.environ.get("OPENBLAS_CORETYPE")
    line = select_coretype()
    if line and os.environ.get("OPENBLAS_CORETYPE") != before and launcher_rank() in (None, 0):
        print(f"[hpcsgd] {line}", file=sys.stderr, flush=True)


def load_config(args, world_size: int, check_paths: bool = True) -> dict:
    """The resolved config: schema, combinations (:mod:`.config`) and component options (:mod:`.checks`)."""
    from hpcsgd.train.checks import check_components

    if not args.config:
        raise ConfigError("no config file given: hpcsgd train CONFIG.yaml (see --help-config)")
    cfg = C.resolve(C.merge(C.load_yaml(args.config), args.overrides), world_size, check_paths=check_paths)
    check_components(cfg)
    if cfg["gpu"] and check_paths and importlib.util.find_spec("cupy") is None:
        raise ConfigError("config key 'gpu' is true but CuPy is not installed "
                          "(pip install 'hpcsgd[gpu]'), or set gpu: false")
    return cfg


def main(args) -> int:
    if args.help_config:
        print("config keys (key, default, meaning):\n" + C.describe())
        return 0
    _select_blas()
    planned = args.dry_run and args.world_size is not None
    rank, size = (0, args.world_size) if planned else _world()
    try:  # everything here is local: a bad config exits 2 on every rank before any collective
        if args.world_size is not None and not args.dry_run:
            raise ConfigError("--world-size only plans a --dry-run; launch the ranks with mpiexec/srun")
        if not args.dry_run and not args.out:
            raise ConfigError("--out DIR is required")
        cfg = load_config(args, size, check_paths=not args.dry_run)
        timeline_iters = _iter_range(args.timeline_iters)
    except ConfigError as e:
        if rank == 0:
            print(f"hpcsgd train: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from hpcsgd.train.plan import dry_run

        return dry_run(cfg, args, planned)
    return _run_or_abort(cfg, args, timeline_iters, rank, size)


def _iter_range(text: str) -> range:
    try:
        return parse_iter_range(text)
    except ValueError as e:
        raise ConfigError(f"--timeline-iters {text!r}: expected A:B ({e})") from e


def _report_dead_jobs(board_dir: str, rank: int, size: int) -> None:
    """Rank 0 prints and removes the boards of earlier jobs on this output that died.

    A job killed from outside (hydra after a SIGKILLed rank) leaves its watchdog board
    behind; on ``--resume`` its report says which rank stopped first. The barrier keeps
    this job's ranks from creating their own board before the old ones are gone.
    """
    if rank == 0:
        from hpcsgd.runtime.board import postmortem

        for report in postmortem(board_dir, remove=True):
            sys.stderr.write(report + "\n")
    if size > 1:
        from mpi4py import MPI

        MPI.COMM_WORLD.Barrier()


def _run_or_abort(cfg: dict, args, timeline_iters: range, rank: int, size: int) -> int:
    """Train; an exception anywhere prints this rank's traceback and aborts the whole job."""
    import hpcsgd.runtime.abort
    import hpcsgd.runtime.watchdog
    from hpcsgd.train.loop import train

    hpcsgd.runtime.abort.install()  # an uncaught exception in any thread aborts the whole job
    # Collective watchdog ($HPCSGD_COLLECTIVE_TIMEOUT, default 600 s; 0: off); its board of
    # per-rank states lives in the output directory, which every node sees when checkpoints do.
    board_dir = os.path.join(args.out, "watchdog")
    _report_dead_jobs(board_dir, rank, size)
    hpcsgd.runtime.watchdog.install(board_dir=board_dir)
    try:
        summary = train(cfg, args.out, resume=args.resume, timeline=args.timeline,
                        timeline_iters=timeline_iters)
        hpcsgd.runtime.watchdog.uninstall()
    except Exception as e:
        sys.stdout.flush()
        code = 2 if isinstance(e, (ConfigError, DataError)) else 1  # 2: hpcsgd launch never restarts it
        if size > 1:  # print this rank's traceback, then MPI_Abort: no rank is left waiting
            from hpcsgd.runtime.abort import abort_job

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
