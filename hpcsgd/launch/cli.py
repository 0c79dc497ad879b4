"""``hpcsgd launch``: run ``hpcsgd train`` under mpiexec or srun and restart it when it fails.

    hpcsgd launch -n 4 --max-restarts 3 -- train CONFIG.yaml --out runs/x
    hpcsgd launch -n 16 --hosts node1:8,node2:8 -- train CONFIG.yaml --out /shared/runs/x
    hpcsgd launch -n 1024 --launcher srun --launcher-args=--mpi=pmix -- train akiba32k.yaml --out $SCRATCH/a

An attempt that ends abnormally (a killed rank, a hang caught by the watchdog,
a lost host; see :mod:`hpcsgd.launch.causes`) is relaunched with ``--resume
auto`` after a backoff, up to ``--max-restarts`` times; a config or data error
(exit 2) never is. Each attempt, end and restart is logged with its cause to
stderr (``hpcsgd launch: ...``) and as a JSON line to ``OUT/launch/events.jsonl``.
A job whose ranks all marked done but which does not exit within
``--finalize-grace`` seconds is ended and counts as a success.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import sys
import time

from hpcsgd.errors import ConfigError
from hpcsgd.launch import markers
from hpcsgd.launch.attempt import Attempt
from hpcsgd.launch.causes import CONFIG_EXIT, classify

EVENTS = os.path.join("launch", "events.jsonl")  # under OUT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--ranks", type=int, required=True, help="number of MPI ranks")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="relaunches after abnormal ends (default 3; 0: never)")
    p.add_argument("--backoff", type=float, default=10.0,
                   help="seconds before the first restart, doubled for each further one (default 10)")
    p.add_argument("--max-backoff", type=float, default=300.0,
                   help="cap of the backoff in seconds (default 300)")
    p.add_argument("--finalize-grace", type=float, default=30.0,
                   help="seconds a job may take to exit once every rank marked done (default 30)")
    p.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto",
                   help="auto: srun inside a Slurm job ($SLURM_JOB_ID) when srun exists, else mpiexec")
    p.add_argument("--hosts", default=None, help="mpiexec -hosts list, e.g. node1:8,node2:8")
    p.add_argument("--launcher-args", default="", metavar="'ARGS'",
                   help="more launcher options, one shell-quoted string: --launcher-args='-ppn 8' "
                        "(write it with '=': a lone option would be read as a launch option)")
    p.add_argument("--entry", default=None, metavar="'CMD'",
                   help="program each rank runs with 'train ARGS' (default: this Python's -m hpcsgd), "
                        "e.g. a container wrapper")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- train CONFIG.yaml [hpcsgd train options]")


def _train_options(job: list[str]) -> tuple[list[str], argparse.Namespace]:
    """The ``hpcsgd train`` arguments after ``--``, parsed with train's own parser."""
    from hpcsgd.train.cli import add_arguments as train_arguments

    if job and job[0] == "--":
        job = job[1:]
    if not job or job[0] != "train":
        raise ConfigError("expected '-- train CONFIG.yaml --out DIR [options]' after the launch options, got "
                          f"{shlex.join(job) or 'nothing'}")
    p = argparse.ArgumentParser(prog="hpcsgd launch -- train", add_help=False, exit_on_error=False)
    train_arguments(p)
    try:
        ns, unknown = p.parse_known_args(job[1:])
    except argparse.ArgumentError as e:
        raise ConfigError(f"hpcsgd train options: {e}") from e
    if unknown:
        raise ConfigError(f"unknown hpcsgd train options: {' '.join(unknown)}")
    if not ns.config:
        raise ConfigError("no config file given: -- train CONFIG.yaml --out DIR")
    if not ns.out:
        raise ConfigError("-- train ... --out DIR is required: restarts resume from DIR/checkpoints")
    for flag in ("dry_run", "help_config"):
        if getattr(ns, flag):
            raise ConfigError(f"--{flag.replace('_', '-')} does not train: run it with hpcsgd train directly")
    return job[1:], ns


def resume_args(train_args: list[str], out: str) -> list[str]:
    """Arguments of a restart: ``--resume auto`` once OUT/checkpoints holds a checkpoint.

    Before the first checkpoint the original arguments stand (a ``--resume DIR``
    of another run is still the right starting point).
    """
    if not glob.glob(os.path.join(out, "checkpoints", "ckpt-*.json")):
        return list(train_args)
    args, i = [], 0
    while i < len(train_args):
        a = train_args[i]
        if a == "--resume":
            i += 2
            continue
        if not a.startswith("--resume="):
            args.append(a)
        i += 1
    return [*args, "--resume", "auto"]


def choose_launcher(name: str, env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if name != "auto":
        return name
    return "srun" if env.get("SLURM_JOB_ID") and shutil.which("srun") else "mpiexec"


def mpiexec_path() -> str:
    """The mpiexec next to this Python (the venv's MPI), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")


def build_command(args, train_args: list[str], launcher: str) -> list[str]:
    entry = shlex.split(args.entry) if args.entry else [sys.executable, "-m", "hpcsgd"]
    extra = shlex.split(args.launcher_args)
    if launcher == "srun":
        if args.hosts:
            raise ConfigError("--hosts is for mpiexec; under srun the allocation decides "
                              "(or pass --launcher-args='--nodelist=...')")
        return ["srun", "-n", str(args.ranks), *extra, *entry, "train", *train_args]
    hosts = ["-hosts", args.hosts] if args.hosts else []
    return [mpiexec_path(), "-n", str(args.ranks), *hosts, *extra, *entry, "train", *train_args]


class EventLog:
    """Launcher events: one JSON line each in OUT/launch/events.jsonl, one line each on stderr."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def __call__(self, event: str, message: str, **fields) -> None:
        print(f"hpcsgd launch: {message}", file=sys.stderr, flush=True)
        rec = {"time": time.time(), "event": event, "message": message, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _validate(args) -> None:
    if args.ranks < 1:
        raise ConfigError(f"-n must be >= 1, got {args.ranks}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    for name in ("backoff", "max_backoff", "finalize_grace"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 seconds, got {getattr(args, name)}")


def main(args) -> int:
    try:
        _validate(args)
        train_args, train_ns = _train_options(args.job)
        launcher = choose_launcher(args.launcher)
        build_command(args, train_args, launcher)  # checks the launcher options once, up front
    except ConfigError as e:
        print(f"hpcsgd launch: config error: {e}", file=sys.stderr)
        return CONFIG_EXIT
    out = train_ns.out
    log = EventLog(os.path.join(out, EVENTS))
    return supervise(args, train_args, out, launcher, log)


def supervise(args, train_args: list[str], out: str, launcher: str, log: EventLog) -> int:
    """The restart loop; returns the launcher's exit status."""
    current: list[Attempt] = []

    def on_signal(signum, frame):
        if current:
            current[0].interrupt(signum)
        else:  # between attempts (backoff): nothing to forward
            name = signal.Signals(signum).name
            log("finish", f"the launcher received {name} between attempts; not restarting",
                interrupted=name)
            raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        restarts = 0
        while True:
            attempt_no = restarts + 1
            run_args = train_args if attempt_no == 1 else resume_args(train_args, out)
            cmd = build_command(args, run_args, launcher)
            env = {**os.environ, markers.ATTEMPT_ENV: str(attempt_no)}
            log("start", f"attempt {attempt_no}: {shlex.join(cmd)}", attempt=attempt_no, cmd=cmd,
                launcher=launcher)
            att = Attempt(cmd, env, out, args.ranks, args.finalize_grace,
                          log=lambda m, a=attempt_no: log("note", f"attempt {a}: {m}", attempt=a))
            current[:] = [att]
            res = att.run()
            current.clear()
            outcome = classify(res.returncode, res.tail, all_done=res.all_done_at is not None,
                               finalize_killed=res.finalize_killed)
            fields = dict(attempt=attempt_no, returncode=res.returncode, kind=outcome.kind,
                          cause=outcome.cause, seconds=round(res.ended - res.started, 3),
                          all_done_at=res.all_done_at)
            if res.interrupted is not None:
                name = signal.Signals(res.interrupted).name
                log("end", f"attempt {attempt_no} stopped: the launcher received {name} (forwarded to the "
                    f"job); not restarting", interrupted=name, **fields)
                return 128 + res.interrupted
            log("end", f"attempt {attempt_no} ended: {outcome.cause}", **fields)
            if outcome.restart:  # a fault, not a config/data error: say where each rank stopped
                _log_postmortem(out, log, attempt_no)
            if outcome.success:
                log("finish", f"done after {attempt_no} attempt(s) ({restarts} restart(s)): {outcome.kind}",
                    attempts=attempt_no, restarts=restarts, kind=outcome.kind, cause=outcome.cause)
                return 0
            code = res.returncode if 0 < res.returncode < 256 else 1
            if not outcome.restart:
                log("finish", f"not restarting: {outcome.cause}", attempts=attempt_no, restarts=restarts,
                    kind=outcome.kind, cause=outcome.cause, returncode=code)
                return code
            if restarts >= args.max_restarts:
                log("finish", f"giving up: {restarts} restart(s) used of --max-restarts {args.max_restarts}; "
                    f"last cause: {outcome.cause}", attempts=attempt_no, restarts=restarts,
                    kind=outcome.kind, cause=outcome.cause, returncode=code)
                return code
            restarts += 1
            delay = min(args.backoff * 2 ** (restarts - 1), args.max_backoff)
            log("restart", f"restart {restarts} of {args.max_restarts} in {delay:g} s with --resume auto; "
                f"cause: {outcome.cause}", restart=restarts, max_restarts=args.max_restarts, delay=delay,
                kind=outcome.kind, cause=outcome.cause)
            time.sleep(delay)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _log_postmortem(out: str, log, attempt_no: int) -> None:
    """Log the last state of every rank of a job that died (its watchdog board), then clear it.

    A killed job cannot clean its board, so the board says which rank stopped first
    and which collective the others waited in; the next attempt starts with none.
    """
    from hpcsgd.runtime.board import postmortem

    for report in postmortem(os.path.join(out, "watchdog"), remove=True):
        log("note", report, attempt=attempt_no)
