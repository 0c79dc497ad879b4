"""Batch jobs: headers, global-batch arithmetic of the papers, and their --dry-run plans.

Each Slurm/PBS script is run with ``DRY_RUN=1`` (it prints the plan and the
launch command, launches nothing); each config is resolved for the planned
world size with ``hpcsgd train --dry-run --world-size W --format json``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"

# name: (nodes, ranks per node, images per rank, global batch, recipe, wire dtype, gpu) from papers.md
PAPERS = {
    "akiba32k": (128, 8, 32, 32768, "akiba", "float16", True),   # Akiba: 1024 P100 x 32
    "goyal8k": (32, 8, 32, 8192, "goyal", "float32", True),      # Goyal: 256 P100 x 32
    "lars32k": (1024, 2, 16, 32768, "lars", "float32", False),   # You et al.: 1024 nodes x 2 sockets
}
IMAGENET_TRAIN = 1281167


def _env():
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for k in [k for k in env if k.startswith(("SLURM_", "PBS_"))]:
        del env[k]
    return env


def slurm_header(path: Path) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), re.M))


def pbs_select(path: Path) -> tuple[int, int]:
    m = re.search(r"^#PBS -l select=(\d+):.*mpiprocs=(\d+)", path.read_text(), re.M)
    assert m, f"{path}: no '#PBS -l select=N:...:mpiprocs=M' line"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_headers_match_the_papers(name):
    nodes, rpn, per_rank, glob, *_ = PAPERS[name]
    assert nodes * rpn * per_rank == glob
    h = slurm_header(JOBS / "slurm" / f"{name}.sbatch")
    assert (int(h["nodes"]), int(h["ntasks-per-node"])) == (nodes, rpn), h
    assert pbs_select(JOBS / "pbs" / f"{name}.pbs") == (nodes, rpn)
    for script in (JOBS / "slurm" / f"{name}.sbatch", JOBS / "pbs" / f"{name}.pbs", JOBS / "local.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_config_resolves_with_paper_arithmetic(name, capsys):
    from hpcsgd.cli import main

    nodes, rpn, per_rank, glob, recipe, wire, gpu = PAPERS[name]
    rc = main(["train", str(JOBS / "configs" / f"{name}.yaml"), "--dry-run", "--world-size",
               str(nodes * rpn), "--ranks-per-node", str(rpn), "--format", "json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    plan = json.loads(out)
    cfg = plan["config"]
    assert (cfg["batch_per_rank"], cfg["global_batch"], cfg["grad_accumulation"]) == (per_rank, glob, 1)
    assert (cfg["recipe"], cfg["wire_dtype"], cfg["gpu"], cfg["model"]) == (recipe, wire, gpu, "resnet50")
    assert cfg["communicator"] == "hierarchical" and cfg["epochs"] == 90
    assert plan["topology"]["nodes"] == nodes and plan["topology"]["ranks_per_node"] == rpn
    assert plan["iters_per_epoch"] == IMAGENET_TRAIN // glob  # 39 for 32k, 156 for 8k
    assert plan["total_iterations"] == 90 * (IMAGENET_TRAIN // glob)
    lr = {row["epoch"]: row["lr"] for row in plan["schedule"]}
    eta = 0.1 * glob / 256
    if recipe == "goyal":  # 5-epoch warm-up from 0.1 to 0.1 x 8192/256 = 3.2, x0.1 at 30/60/80
        assert lr[0.0] == pytest.approx(0.1) and lr[10.0] == pytest.approx(eta)
        assert lr[40.0] == pytest.approx(eta * 0.1)
    if recipe == "akiba":  # slow start: 0.5 eta_base = 6.4 until epoch 40, then 0.075 eta_base
        assert lr[0.0] == pytest.approx(0.5 * eta) and lr[40.0] == pytest.approx(0.075 * eta)
    if recipe == "lars":  # polynomial decay to ~0 at the end
        assert lr[85.0] < lr[10.0]


def test_job_scripts_print_plan_and_command():
    # One script per config, both batch systems covered (the pairs share jobs/lib.sh and the
    # config; test_headers_match_the_papers checks every header), all at once: mostly start-up.
    procs = {}
    for kind, name in (("slurm", "akiba32k"), ("pbs", "goyal8k"), ("slurm", "lars32k"), ("pbs", "lars32k")):
        ext = "sbatch" if kind == "slurm" else "pbs"
        procs[kind, name] = subprocess.Popen(
            ["bash", str(JOBS / kind / f"{name}.{ext}")], cwd=ROOT, env=dict(_env(), DRY_RUN="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for (kind, name), p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"{kind}/{name}:\n{out}\n{err}"
        nodes, rpn, per_rank, glob, *_ = PAPERS[name]
        ranks = nodes * rpn
        assert f"{ranks} ranks x {per_rank} x 1 = {glob}" in out, out
        assert f"{ranks} ranks on {nodes} node(s)" in out, out
        launcher = ("srun --launcher-args=--mpi=pmix" if kind == "slurm"
                    else f"mpiexec --launcher-args=-ppn {rpn}")
        assert re.search(rf"running: hpcsgd launch -n {ranks} --launcher {re.escape(launcher)}.* "
                         rf"--max-restarts 3 .*-- train jobs/configs/{name}.yaml .*--resume auto", out), out
        assert "DRY_RUN=1: not launching" in out


def test_bad_job_config_fails_naming_the_key():
    p = subprocess.run([sys.executable, "-m", "hpcsgd", "train", str(JOBS / "configs" / "akiba32k.yaml"),
                        "--dry-run", "--world-size", "1000", "--ranks-per-node", "8"],
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "'global_batch'=32768" in p.stderr and "1000 x 32" in p.stderr, p.stderr
