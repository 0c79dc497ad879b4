"""``hpcsgd launch``: restarts after a killed rank end bitwise equal to an uninterrupted run.

Each launch runs as ``python -m hpcsgd launch ...`` in a subprocess with a hard
timeout (its own session, killed whole on a timeout). The restart tests run a
small ResNet on synthetic data with 2 ranks on this machine; the rest use tiny
``--entry`` programs that stand in for the ranks.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cluster.faultlog import record

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.mpi

CONFIG = """\
dataset: synthetic
dataset_options: {shape: [3, 8, 8], n_classes: 4, n: 256, pool: 64}
model: resnet_small
model_options: {depth: 8, width: 4}
bn_mode: batch
batch_per_rank: 8
recipe: sgd
epochs: 4.0
seed: 5
loader_workers: 0
eval_interval: 0
eval_batch: 64
checkpoint_interval: 4
keep_checkpoints: 3
log_interval: 8
progress: false
kernels: false
"""
# 256 samples / (2 ranks x 8) = 16 iterations per epoch, 64 in all; a checkpoint every 4.
KILL_AFTER_CKPT = 4  # rank 1 is SIGKILLed once checkpoint 4 is on disk: 60 iterations still to go


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                       if p]])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Launch:
    """``python -m hpcsgd launch ARGS`` with a timeout; output lines are kept as they come."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "hpcsgd", "launch", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=str(ROOT), env=env or _env(), start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait(self, timeout: float) -> tuple[int | None, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        self.ended = time.time()
        self._reader.join(timeout=5)
        return rc, "".join(self.lines)


def launch(args: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    return Launch(args, env).wait(timeout)


def events(out: Path) -> list[dict]:
    path = out / "launch" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_checkpoint(out: Path):
    from hpcsgd.train.checkpoint import load_latest

    ck = load_latest(str(out / "checkpoints"), log=lambda m: None)
    assert ck is not None, f"no checkpoint in {out}"
    return ck


def _kill_rank_after_checkpoint(out: Path, rank: int, iteration: int, killed: list) -> None:
    """SIGKILL ``rank`` (pid from the watchdog board) once checkpoint ``iteration`` exists."""
    deadline = time.time() + 200
    manifest = out / "checkpoints" / f"ckpt-{iteration:08d}.json"
    while time.time() < deadline and not manifest.exists():
        time.sleep(0.02)
    for path in glob.glob(str(out / "watchdog" / "hpcsgd-watchdog-*" / f"rank{rank}.json")):
        pid = json.loads(Path(path).read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append((time.time(), pid))
        return


def test_killed_rank_is_restarted_and_ends_bitwise_equal(tmp_path, request):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    common = ["-n", 2, "--backoff", 0, "--finalize-grace", 30]
    env = _env(OMP_NUM_THREADS=1, HPCSGD_COLLECTIVE_TIMEOUT=60)

    ref_out = tmp_path / "ref"
    rc, text = launch([*common, "--max-restarts", 0, "--", "train", cfg, "--out", ref_out], 240, env)
    assert rc == 0, text[-4000:]
    reference = final_checkpoint(ref_out)
    assert reference.iteration == 64

    out = tmp_path / "killed"
    killed: list = []
    job = Launch([*common, "--max-restarts", 2, "--", "train", cfg, "--out", out], env)
    killer = threading.Thread(target=_kill_rank_after_checkpoint, args=(out, 1, KILL_AFTER_CKPT, killed),
                              daemon=True)
    killer.start()
    rc, text = job.wait(300)
    killer.join(timeout=1)
    assert killed, f"checkpoint {KILL_AFTER_CKPT} never appeared:\n{text[-3000:]}"
    assert rc == 0, text[-5000:]
    ev = events(out)
    restarts = [e for e in ev if e["event"] == "restart"]
    assert len(restarts) == 1, ev
    assert restarts[0]["kind"] == "signal" and "killed by signal 9" in restarts[0]["cause"], restarts
    assert ("hpcsgd launch: restart 1 of 2 in 0 s with --resume auto; cause: a rank was killed by signal 9"
            in text), text[-3000:]
    starts = [e for e in ev if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["cmd"][-2:] == ["--resume", "auto"], starts
    assert ev[-1]["event"] == "finish" and ev[-1]["kind"] == "ok" and ev[-1]["restarts"] == 1, ev[-1]
    assert "resumed from" in text, text[-3000:]
    dead = [e for e in ev if e["event"] == "note" and "ended abnormally" in e["message"]]
    assert len(dead) == 1 and dead[0]["attempt"] == 1, ev  # the killed job's watchdog board, explained
    assert not list((out / "watchdog").glob("hpcsgd-watchdog-*")), "the dead job's board was not cleared"

    final = final_checkpoint(out)
    assert final.iteration == reference.iteration
    keys = [k for k in reference.arrays if k.startswith("model")]
    assert keys, sorted(reference.arrays)[:10]
    for k in keys:
        assert np.array_equal(final.arrays[k], reference.arrays[k]), f"{k} differs from the uninterrupted run"
    t_kill = killed[0][0]
    restart_at = restarts[0]["time"]
    from hpcsgd.train.checkpoint import list_checkpoints

    resumed_from = next((line for line in text.splitlines() if "resumed from" in line), "")
    record("f8_launch_restart", order=8, fault="A rank is SIGKILLed under `hpcsgd launch`",
           injected=f"rank 1 of 2 SIGKILLed from outside once checkpoint {KILL_AFTER_CKPT} of 64 iterations "
                    "is on disk (hpcsgd launch -n 2 --max-restarts 2 -- train ...)",
           outcome="launcher logs the restart with its cause (a rank was killed by signal 9) and relaunches "
                   "with `--resume auto`; exit 0; final parameters bitwise equal to an uninterrupted run",
           detect_s=restart_at - t_kill, bound_s=15,
           data_lost=f"iterations after the last checkpoint (recomputed); "
                     f"{len(list_checkpoints(str(out / 'checkpoints')))} checkpoints kept",
           test=request.node.nodeid,
           evidence="\n".join([restarts[0]["message"], resumed_from.strip().replace(str(out), "OUT")]))
    assert restart_at - t_kill < 15, restart_at - t_kill


def test_config_error_exits_2_without_restart(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 3\n")
    out = tmp_path / "out"
    rc, text = launch(["-n", 2, "--max-restarts", 3, "--backoff", 0, "--", "train", cfg, "--out", out], 90)
    assert rc == 2, text
    assert "unknown config key 'batch_size'" in text, text
    ev = events(out)
    assert [e["event"] for e in ev] == ["start", "end", "finish"], ev
    assert ev[-1]["kind"] == "config" and "not restarting: config or data error (exit 2)" in text, text


def test_data_error_exits_2_without_restart(tmp_path):
    """A truncated JPEG met during training: the rank aborts with 2 (DataError), never restarted."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    bad = tmp_path / "data" / "train" / "dog" / "2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset: imagenet_folder\ndata_path: {tmp_path / 'data'}\n"
                   f"val_path: {tmp_path / 'data'}\n"
                   "model: resnet_small\nmodel_options: {depth: 8, width: 4}\nbatch_per_rank: 2\n"
                   "recipe: sgd\nepochs: 1.0\nloader_workers: 0\neval_interval: 0\nprogress: false\n"
                   "kernels: false\n")
    out = tmp_path / "out"
    rc, text = launch(["-n", 2, "--max-restarts", 3, "--backoff", 0, "--", "train", cfg, "--out", out], 120)
    assert rc == 2, text[-4000:]
    assert "DataError" in text and "2.JPEG" in text, text[-4000:]
    ev = events(out)
    assert [e["event"] for e in ev] == ["start", "end", "finish"], ev
    assert ev[-1]["kind"] == "config", ev[-1]


def test_restart_budget_exhausted_names_the_cause(tmp_path):
    # Every attempt's ranks kill themselves: 1 + 2 attempts, then the launcher gives up.
    entry = f"{sys.executable} -c 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'"
    out = tmp_path / "out"
    rc, text = launch(["-n", 2, "--max-restarts", 2, "--backoff", 0, "--entry", entry, "--",
                       "train", "any.yaml", "--out", out], 90)
    assert rc not in (None, 0), text
    ev = events(out)
    assert [e["event"] for e in ev].count("start") == 3, ev
    assert [e["event"] for e in ev].count("restart") == 2, ev
    assert ev[-1]["event"] == "finish" and ev[-1]["kind"] == "signal", ev[-1]
    assert "giving up: 2 restart(s) used of --max-restarts 2; last cause: a rank was killed by signal 9" \
        in text, text


# The ranks write their completion marker, then never exit (as if stuck in MPI_Finalize).
DONE_THEN_HANG = ("import sys, time; from hpcsgd.launch.markers import mark_done; "
                  "mark_done(sys.argv[sys.argv.index('--out') + 1]); time.sleep(600)")


def test_finalize_grace_ends_a_finished_job(tmp_path):
    out = tmp_path / "out"
    grace = 2.0
    job = Launch(["-n", 2, "--finalize-grace", grace, "--entry", f"{sys.executable} -c \"{DONE_THEN_HANG}\"",
                  "--", "train", "any.yaml", "--out", out])
    rc, text = job.wait(60)
    assert rc == 0, text
    ev = events(out)
    assert ev[-1]["event"] == "finish" and ev[-1]["kind"] == "finalize-hang", ev
    done_at = next(e["all_done_at"] for e in ev if e["event"] == "end")
    assert grace <= job.ended - done_at < grace + 8, job.ended - done_at
    assert "not exited 2 s after every rank marked done: ending it (results are complete)" in text, text


def test_sigterm_is_forwarded_and_not_restarted(tmp_path):
    out = tmp_path / "out"
    sleeper = f"{sys.executable} -c 'import time; time.sleep(600)'"
    job = Launch(["-n", 2, "--max-restarts", 3, "--entry", sleeper, "--", "train", "any.yaml", "--out", out])
    deadline = time.time() + 30
    while time.time() < deadline and not any(e["event"] == "start" for e in events(out)):
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(job.proc.pid, signal.SIGTERM)
    rc, text = job.wait(30)
    assert rc == 128 + signal.SIGTERM, text
    ev = events(out)
    assert [e["event"] for e in ev].count("start") == 1 and ev[-1].get("interrupted") == "SIGTERM", ev


# -- no MPI ------------------------------------------------------------------------------

def test_classify_exit_statuses():
    from hpcsgd.launch.causes import classify

    hydra_kill = ["=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES", "=   RUNNING AT vm",
                  "YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)"]
    assert classify(9, hydra_kill).kind == "signal" and classify(9, hydra_kill).restart
    sigint = ["YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Interrupt (signal 2)"]
    assert classify(2, sigint).kind == "signal"  # exit 2 from a signal is not a config error
    cfg = classify(2, ["hpcsgd train: config error: unknown config key 'x'"])
    assert cfg.kind == "config" and not cfg.restart and "unknown config key" in cfg.cause
    hang = classify(3, ["hpcsgd: rank 0/4 (host a, pid 1): collective timeout: collective 'allreduce'"])
    assert hang.kind == "hang" and hang.restart and "collective timeout" in hang.cause
    assert classify(1, ["hpcsgd: rank 3/4 (host a, pid 2): uncaught RuntimeError"]).kind == "exception"
    assert classify(255, ["ssh: connect to host n2 port 22: No route to host"]).kind == "host"
    assert classify(-9, []).kind == "launcher-signal"
    assert classify(0, []).success and not classify(0, []).restart
    srun = classify(137, ["srun: error: n3: task 5: Killed"])
    assert srun.kind == "signal" and "signal 9" in srun.cause
    assert classify(7, [], all_done=True).kind == "finished" and classify(7, [], all_done=True).success
    fin = classify(0, [], all_done=True, finalize_killed=True)
    assert fin.kind == "finalize-hang" and fin.success and not fin.restart


def test_restart_arguments_and_commands(tmp_path, monkeypatch):
    import argparse

    from hpcsgd.errors import ConfigError
    from hpcsgd.launch.cli import add_arguments, build_command, choose_launcher, resume_args

    args = ["cfg.yaml", "--out", str(tmp_path), "--resume", "/old/run", "--set", "epochs=2"]
    assert resume_args(args, str(tmp_path)) == args  # no checkpoint yet: the original start point
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-4.json").write_text("{}")
    assert resume_args(args, str(tmp_path)) == ["cfg.yaml", "--out", str(tmp_path), "--set", "epochs=2",
                                                "--resume", "auto"]
    assert resume_args(["c", "--resume=x"], str(tmp_path)) == ["c", "--resume", "auto"]

    assert choose_launcher("auto", {}) == "mpiexec"
    assert choose_launcher("srun", {}) == "srun"
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(["-n", "4", "--hosts", "a:2,b:2", "--launcher-args", "-ppn 2", "--", "train", "c.yaml"])
    cmd = build_command(ns, ["c.yaml", "--out", "o"], "mpiexec")
    assert cmd[1:5] == ["-n", "4", "-hosts", "a:2,b:2"] and cmd[5:7] == ["-ppn", "2"], cmd
    assert cmd[-6:] == ["-m", "hpcsgd", "train", "c.yaml", "--out", "o"], cmd
    with pytest.raises(ConfigError, match="--hosts is for mpiexec"):
        build_command(ns, ["c.yaml"], "srun")
    ns.hosts = None
    assert build_command(ns, ["c.yaml"], "srun")[:5] == ["srun", "-n", "4", "-ppn", "2"]
    ns = p.parse_args(["-n", "2", "--launcher-args=--mpi=pmix", "--", "train", "c.yaml"])  # one option
    assert build_command(ns, ["c.yaml"], "srun")[:4] == ["srun", "-n", "2", "--mpi=pmix"]


@pytest.mark.parametrize("job, message", [
    (["--", "train", "c.yaml"], "--out DIR is required"),
    (["--", "c.yaml", "--out", "o"], "expected '-- train CONFIG.yaml"),
    (["--", "train", "c.yaml", "--out", "o", "--dry-run"], "--dry-run does not train"),
    (["--", "train", "c.yaml", "--out", "o", "--bogus"], "unknown hpcsgd train options: --bogus"),
])
def test_bad_launch_arguments_exit_2(tmp_path, capsys, job, message):
    from hpcsgd.cli import main

    assert main(["launch", "-n", "2", *job]) == 2
    assert message in capsys.readouterr().err
