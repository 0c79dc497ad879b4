"""Faults on 2 emulated hosts (needs root): a host's link cut mid-run, and after the last collective.

``hpcsgd train`` runs on 2 emulated hosts x 2 ranks with a checkpoint every 3
iterations. Once the first checkpoint exists, host 1's link goes down (both ends
of its veth: no RST, no FIN, like a pulled cable). The collective watchdog must
abort the job within its timeout, the last checkpoint must pass its checksum,
``--resume auto`` (link restored) must complete the run, and its final parameters
must equal those of an uninterrupted run.

A second, MPI-only test (no training) checks the watchdog's message for a cut
link: every rank arrived, the collective is stuck in the network.

A third cuts the link after every rank has written its results and marked done,
before MPI_Finalize: MPICH then hangs in finalize (mpiexec waits for the proxy
on the unreachable host), and ``hpcsgd launch`` must end the job within its
``--finalize-grace`` and exit 0.
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
from cluster.fixture import emulated_hosts
from cluster.launch import run_job

pytestmark = [pytest.mark.mpi, pytest.mark.root]
TIMEOUT = 6.0  # HPCSGD_COLLECTIVE_TIMEOUT for these jobs, seconds

CONFIG = """\
dataset: synthetic
dataset_options: {shape: [3, 16, 16], n_classes: 4, n: 384, pool: 64}
model: resnet_small
model_options: {depth: 8, width: 4}
bn_mode: batch
batch_per_rank: 8
recipe: sgd
epochs: 4.0
seed: 3
loader_workers: 0
eval_interval: 0
eval_batch: 64
checkpoint_interval: 3
keep_checkpoints: 3
log_interval: 4
progress: false
kernels: false
"""
# 384 samples / (4 ranks x 8) = 12 iterations per epoch, 48 in all; checkpoints every 3. Long
# enough that the link is cut mid-run on a fast machine (at 1 epoch, 12 iterations ended within
# the 0.3 s between the first checkpoint and the cut).

# hpcsgd train with the collective watchdog on (whether or not `hpcsgd train` installs it itself).
TRAIN = ("import sys, hpcsgd.runtime.abort as a, hpcsgd.runtime.watchdog as w; a.install(); w.install(); "
         "from hpcsgd.cli import main; sys.exit(main(['train'] + sys.argv[1:]))")


@pytest.fixture(scope="module")
def two_hosts(request):
    return emulated_hosts(request, n_hosts=2)


def _train(cluster, cfg: Path, out: Path, *extra, timeout=150, on_line=None):
    env = {**cluster.env(), "HPCSGD_COLLECTIVE_TIMEOUT": TIMEOUT, "OMP_NUM_THREADS": 1,
           "HPCSGD_WATCHDOG_DIR": out.parent / "watchdog"}
    return run_job([sys.executable, "-c", TRAIN, str(cfg), "--out", str(out), *extra], 4,
                   timeout=timeout, env=env, mpiexec_args=cluster.mpiexec_args(ranks_per_host=2),
                   on_line=on_line)


def _final_params(out: Path) -> dict:
    from hpcsgd.train.checkpoint import load_latest

    ck = load_latest(str(out / "checkpoints"), log=lambda m: None)
    assert ck is not None, f"no checkpoint in {out}"
    return ck


def test_link_cut_aborts_and_resume_completes(two_hosts, tmp_path, request):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)

    # 1. uninterrupted reference run
    ref = _train(two_hosts, cfg, tmp_path / "ref")
    assert not ref.timed_out and ref.returncode == 0, ref.output[-4000:]
    reference = _final_params(tmp_path / "ref")

    # 2. the same run; cut host 1's link once the first checkpoint is on disk
    out = tmp_path / "cut"
    ckpt_dir = out / "checkpoints"
    cut_at: list[float] = []

    def cutter():
        deadline = time.time() + 120
        while time.time() < deadline and not glob.glob(str(ckpt_dir / "ckpt-*.json")):
            time.sleep(0.05)
        time.sleep(0.3)
        cut_at.append(time.time())
        two_hosts.cut_link(1)

    th = threading.Thread(target=cutter, daemon=True)
    th.start()
    try:
        cut = _train(two_hosts, cfg, out, timeout=120)
    finally:
        th.join(timeout=1)
        two_hosts.restore_link(1)
    from cluster.netns import kill_namespace_processes

    kill_namespace_processes(two_hosts.hosts[1].name)  # ranks stranded behind the cut link
    assert cut_at, f"no checkpoint appeared before the job ended:\n{cut.output[-3000:]}"
    assert not cut.timed_out, f"the job hung after the link cut:\n{cut.output[-4000:]}"
    assert cut.returncode != 0, cut.output[-3000:]
    detect = cut.ended - cut_at[0]
    assert detect < TIMEOUT + 10, f"job ended {detect:.1f} s after the cut (timeout {TIMEOUT} s)"
    assert "collective timeout" in cut.output, cut.output[-3000:]
    from hpcsgd.train.checkpoint import list_checkpoints, load_latest

    notes = []
    survived = load_latest(str(ckpt_dir), log=notes.append)
    assert survived is not None and not notes, f"last checkpoint damaged: {notes}"
    last_iter = survived.iteration
    assert last_iter < reference.iteration

    # 3. resume with the link restored: completes, same final parameters as the reference
    res = _train(two_hosts, cfg, out, "--resume", "auto")
    assert not res.timed_out and res.returncode == 0, res.output[-4000:]
    assert "resumed from" in res.output, res.output[-2000:]
    final = _final_params(out)
    assert final.iteration == reference.iteration
    model_keys = [k for k in reference.arrays if k.startswith("model")]
    assert model_keys, sorted(reference.arrays)[:10]
    for k in model_keys:
        assert np.array_equal(final.arrays[k], reference.arrays[k]), f"{k} differs from the uninterrupted run"
    evidence = cut.output[cut.output.find("collective timeout"):][:500]
    record("f3_link_cut", order=3, fault="The link of one emulated host is cut mid-run",
           injected=f"`ip link set down` on both ends of host 1's veth after the first checkpoint "
                    f"(hpcsgd train, 2 hosts x 2 ranks, HPCSGD_COLLECTIVE_TIMEOUT={TIMEOUT:g})",
           outcome=f"watchdog aborts the job (every rank waiting: stuck in the network); checkpoint "
                   f"{Path(survived.path).name} passes its checksum; `--resume auto` completes; final "
                   f"parameters bitwise equal to an uninterrupted run",
           detect_s=detect, bound_s=TIMEOUT + 10,
           data_lost=f"iterations after {last_iter} (recomputed on resume); "
                     f"{len(list_checkpoints(str(ckpt_dir)))} checkpoints kept",
           test=request.node.nodeid, evidence=evidence)


def test_link_cut_watchdog_message(two_hosts, tmp_path):
    """MPI only: cut host 1's link while 4 ranks loop over allreduces; the watchdog explains."""
    cut_at: list[float] = []

    def on_line(line, proc):
        if line.startswith("iteration 30 ") and not cut_at:
            cut_at.append(time.time())
            two_hosts.cut_link(1)

    try:
        res = run_job([sys.executable, "tests/mpi/check_fault.py", "steady", "0", "100000"], 4,
                      timeout=60,
                      env={**two_hosts.env(), "HPCSGD_COLLECTIVE_TIMEOUT": 4,
                           "HPCSGD_WATCHDOG_DIR": tmp_path},
                      mpiexec_args=two_hosts.mpiexec_args(ranks_per_host=2), on_line=on_line)
    finally:
        two_hosts.restore_link(1)
        from cluster.netns import kill_namespace_processes

        kill_namespace_processes(two_hosts.hosts[1].name)
    assert cut_at, res.output[-2000:]
    assert not res.timed_out and res.returncode != 0, res.output[-3000:]
    out = res.output
    assert "collective timeout: collective 'allreduce'" in out, out[-3000:]
    assert "stuck in the network" in out, out[-3000:]
    assert res.ended - cut_at[0] < 4 + 8, res.ended - cut_at[0]
    assert os.path.exists(f"/var/run/netns/{two_hosts.hosts[1].name}")


LINGER = 3.0  # seconds the ranks wait between marking done and MPI_Finalize (the cut lands in it)
GRACE = 5.0  # hpcsgd launch --finalize-grace


def test_link_lost_after_last_collective_is_ended_by_the_launcher(two_hosts, tmp_path, request):
    from cluster.launch import ROOT, job_env

    from hpcsgd.launch.attempt import KILL_AFTER
    from hpcsgd.launch.markers import done_dir

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.replace("epochs: 4.0", "epochs: 1.0"))
    out = tmp_path / "run"
    mpiexec_args = two_hosts.mpiexec_args(ranks_per_host=2)
    hosts = mpiexec_args[mpiexec_args.index("-hosts") + 1]
    rest = [a for i, a in enumerate(mpiexec_args) if a != "-hosts" and mpiexec_args[i - 1] != "-hosts"]
    cmd = [sys.executable, "-m", "hpcsgd", "launch", "-n", "4", "--hosts", hosts,
           f"--launcher-args={' '.join(rest)}", "--max-restarts", "0", "--finalize-grace", str(GRACE),
           "--entry", f"{sys.executable} tests/cluster/train_then_wait.py",
           "--", "train", str(cfg), "--out", str(out)]
    env = job_env({**two_hosts.env(), "HPCSGD_COLLECTIVE_TIMEOUT": TIMEOUT, "OMP_NUM_THREADS": 1,
                   "HPCSGD_TEST_LINGER": LINGER})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(ROOT), start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    cut_at: list[float] = []
    try:
        deadline = time.time() + 150
        def n_done() -> int:
            return len(glob.glob(f"{done_dir(out)}/rank*.json"))

        while time.time() < deadline and proc.poll() is None and n_done() < 4:
            time.sleep(0.02)
        if proc.poll() is None and n_done() == 4:
            cut_at.append(time.time())
            two_hosts.cut_link(1)
        try:
            rc = proc.wait(timeout=LINGER + GRACE + KILL_AFTER + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        ended = time.time()
    finally:
        two_hosts.restore_link(1)
        from cluster.netns import kill_namespace_processes

        kill_namespace_processes(two_hosts.hosts[1].name)  # ranks stranded behind the cut link
    reader.join(timeout=5)
    text = "".join(lines)
    assert cut_at, f"the ranks never all marked done:\n{text[-4000:]}"
    assert rc == 0, f"launcher exit {rc}:\n{text[-4000:]}"
    events = [json.loads(line) for line in (out / "launch" / "events.jsonl").read_text().splitlines()]
    finish = events[-1]
    assert finish["event"] == "finish" and finish["kind"] == "finalize-hang", events
    assert finish["restarts"] == 0, events
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["iterations"] == summary["total_iterations"] == 12, summary
    assert _final_params(out).iteration == 12
    detect = ended - cut_at[0]
    bound = LINGER + GRACE + KILL_AFTER + 5
    assert detect < bound, f"launcher ended {detect:.1f} s after the cut (bound {bound} s)"
    record("f9_finalize_link_lost", order=9, fault="A host's link dies after the last collective "
           "(in MPI_Finalize)",
           injected=f"`ip link set down` on host 1 once all 4 ranks (2 emulated hosts x 2) wrote their "
                    f"results and completion markers, {LINGER:g} s before they call MPI_Finalize "
                    f"(hpcsgd launch --finalize-grace {GRACE:g})",
           outcome="MPI_Finalize / mpiexec hang (the proxy on the cut host is unreachable); hpcsgd launch "
                   "ends the job's process group after the grace period and exits 0 (results complete); "
                   "summary.json and the final checkpoint intact",
           detect_s=detect, bound_s=bound, data_lost="none (every rank had finished)",
           test=request.node.nodeid,
           evidence="\n".join(e["message"] for e in events[-3:]))
