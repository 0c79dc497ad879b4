"""Running (or reusing) one ``hpcsgd train`` job of the study, and reading what it wrote.

Why a record per run: the study takes hours, so every finished run is kept
as ``OUT/runs/<name>.json`` and reused by any later invocation with the same
settings (its identity is a hash of them, :func:`design.run_key`). A run that
is killed half-way resumes from its own last checkpoint (one per epoch, in
``OUT/work/<name>``, ``hpcsgd train --resume auto``); the work folder is
removed once the record is written.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import machine  # benchmarks/_machine.py: found where convergence_study is

from convergence_study import design as D
from convergence_study.analysis import CHANCE_ERROR

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "jobs" / "configs" / "fashion_mnist.yaml"


#: exit code of ``hpcsgd train`` for a config error: every later run would fail the same way
CONFIG_ERROR_EXIT = 2
#: failed runs in a row after which the study stops (something is wrong with the machine or code)
MAX_FAILURES_IN_A_ROW = 3


class StudyAborted(RuntimeError):
    """A failure that every later run would repeat (config error, or several failures in a row)."""


def code_version() -> dict:
    """The commit the runs execute, and whether ``hpcsgd/`` has uncommitted changes."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "hpcsgd_dirty": bool(git("status", "--porcelain", "--", "hpcsgd").strip())}


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def _dedupe(records: list[dict]) -> list[dict]:
    """One record per iteration, the last written (a resumed run repeats the steps after its checkpoint)."""
    by_it = {}
    for r in records:
        by_it[r["iteration"]] = r
    return [by_it[k] for k in sorted(by_it)]


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished (waited-for) child processes."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def read_run(work: Path) -> dict:
    """Evaluation curve, loss curve, B_noise series and summary fields of a run's output folder.

    B_noise is read where ``hpcsgd train`` logs it (each train record's
    ``noise_scale`` entry, or a flat ``b_noise``); a trainer without the
    estimator gives an empty series and ``noise_summary`` None.
    """
    evals, losses, noise = _log_series(work / "log.rank0.jsonl")
    summary = {}
    if (work / "summary.json").exists():
        summary = json.loads((work / "summary.json").read_text())
    ns = summary.get("noise_scale")
    return {
        "evals": _dedupe(evals),
        "losses": _dedupe(losses),
        "noise": _dedupe(noise),
        "noise_summary": ns if isinstance(ns, dict) and ns.get("measured", True) else None,
        "completed": bool(summary.get("completed")),
        "iterations": summary.get("iterations"),
        "iterations_this_run": summary.get("iterations_this_run"),
        "wall_s": summary.get("wall_seconds"),
        "train_s": summary.get("train_seconds"),
        "images_per_s": summary.get("images_per_s"),
        "skipped_steps": summary.get("skipped_steps", 0),
        "versions": summary.get("versions"),
    }


def _log_series(log: Path) -> tuple[list, list, list]:
    """(evaluations, train losses, B_noise) of a rank's JSONL log, in its order; empty when absent."""
    evals, losses, noise = [], [], []
    if not log.exists():
        return evals, losses, noise
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        kind = rec.get("kind")
        if kind not in ("eval", "train"):
            continue
        at = {"iteration": rec["iteration"], "epoch": rec["epoch"]}
        if kind == "eval" and "top1" in rec:
            evals.append({**at, "error": 100.0 * (1.0 - rec["top1"]), "loss": rec.get("loss")})
        elif kind == "train" and "loss" in rec:
            losses.append({**at, "loss": rec["loss"], "lr": rec.get("lr")})
            ns = rec.get("noise_scale") if isinstance(rec.get("noise_scale"), dict) else {}
            b, raw = ns.get("b_noise", rec.get("b_noise")), ns.get("b_noise_raw", rec.get("b_noise_raw"))
            if b is not None or raw is not None:
                noise.append({**at, "b_noise": b, "b_noise_raw": raw})
    return evals, losses, noise


def _add_seconds(work: Path, seconds: float) -> float:
    """Add ``seconds`` to the run's attempt time kept in its work folder; returns the total."""
    path = work / "attempt_seconds"
    total = (float(path.read_text()) if path.exists() else 0.0) + seconds
    path.write_text(f"{total}\n")
    return total


def final_error(rec: dict) -> float:
    """The run's test error (%) at its last evaluation; chance for a run that diverged or never evaluated."""
    if not rec["evals"] or rec.get("diverged"):
        return CHANCE_ERROR
    err = rec["evals"][-1]["error"]
    return err if math.isfinite(err) else CHANCE_ERROR


def cpu_label(rec: dict) -> str:
    """A record's CPU as the report names it: model name, and family/model and vector class where recorded.

    Why: "AMD EPYC" alone is both the Zen 5 (AVX-512) and the Zen 3 (AVX2) VM, whose runs differ
    3.5x in speed; records before 2026-12-02 evening have only the model name.
    """
    m = rec.get("machine")
    if not m:
        return rec.get("cpu_model", "?")
    return f"{m['cpu_model']} (family {m['cpu_family']} model {m['cpu_model_number']}, {m['vector_class']})"


#: what makes two records' seconds comparable: the same CPU model, vector class and CPU count
HOST_KEYS = ("cpu_model", "cpu_family", "cpu_model_number", "vector_class", "cpus")


def host_sec_per_epoch(d: D.Design, records, host: dict) -> tuple[float | None, int]:
    """This host's seconds per epoch from its own finished runs: (median, runs used), or (None, 0).

    Only whole, quiet runs count: not resumed (a resumed record's seconds cover part of it), not
    loaded, and on a CPU with the same model, vector class and CPU count as ``host``.
    """
    same = [
        D.measured_sec_per_epoch(d, r)
        for r in records
        if r.get("machine") and r.get("completed") and not r.get("resumed") and not r.get("loaded")
        and all(r["machine"].get(k) == host.get(k) for k in HOST_KEYS)
    ]
    return (statistics.median(same), len(same)) if same else (None, 0)


class Study:
    """The record cache and the way runs get executed (``mode``: 'run', 'plan' or 'report')."""

    def __init__(self, d: D.Design, out: Path, mode: str = "run", max_load: float | None = None, log=print):
        self.d, self.out, self.mode, self.log = d, out, mode, log
        self.max_load = max_load if max_load is not None else float(d.ranks) + 1.0
        self.runs_dir = out / "runs"
        self.cache = {}
        for p in sorted(self.runs_dir.glob("*.json")) if self.runs_dir.exists() else []:
            rec = json.loads(p.read_text())
            self.cache[rec["key"]] = rec
        self.planned, self.failures, self.used = {}, [], {}
        self._failed_in_a_row = 0
        host = machine()
        self.vector_class = host["vector_class"]  # picks the cost model's seconds per epoch ...
        # ... unless this host has finished runs of its own: their median
        self.measured_sec_per_epoch, self.measured_runs = host_sec_per_epoch(d, self.cache.values(), host)

    def cost_seconds(self, settings: dict) -> float:
        """The cost model's seconds for one run on this host (:func:`design.run_cost_seconds`)."""
        return D.run_cost_seconds(self.d, settings, self.vector_class, self.measured_sec_per_epoch)

    def run(self, label: str, settings: dict, part: str) -> dict | None:
        """The run's record: cached, or executed now (mode 'run'); None if not available."""
        key = D.run_key(settings)
        rec = self.cache.get(key)
        if rec is None and self.mode == "run":
            rec = self._execute(label, settings)
        if rec is None:
            self.planned.setdefault(
                key,
                {
                    "name": D.run_name(label, settings),
                    "part": part,
                    "seconds": self.cost_seconds(settings),
                },
            )
            return None
        self.used.setdefault(part, {})[key] = rec
        return rec

    def _execute(self, label: str, settings: dict) -> dict | None:
        """One ``hpcsgd train`` run to its record (cached in ``runs/``), or None when it failed."""
        name = D.run_name(label, settings)
        work = self.out / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        load0 = os.getloadavg()
        self.log(
            f"[convergence] {name}: lr {settings['recipe_options']['lr']}, {settings['epochs']:g} epochs "
            f"(load {load0[0]:.2f})"
        )
        rc, elapsed, cpu_share = self._launch(work, settings)
        load1 = os.getloadavg()
        host = machine()
        launcher = (work / "launcher.log").read_text()
        tail = launcher[-4000:]
        diverged = rc != 0 and ("non-finite" in tail.lower() or "nonfinite" in tail.lower())
        if rc != 0 and not diverged:
            self._failed(name, work, rc, tail)
            return None
        self._failed_in_a_row = 0
        rec = read_run(work)
        rec.update(
            key=D.run_key(settings),
            name=name,
            label=label,
            recipe=settings["recipe"],
            batch=settings["global_batch"],
            seed=settings["seed"],
            lr=settings["recipe_options"]["lr"],
            epochs=settings["epochs"],
            settings=settings,
            diverged=diverged,
            iters_per_epoch=D.iters_per_epoch(settings["global_batch"]),
            elapsed_s=elapsed,
            loadavg_start=load0,
            loadavg_end=load1,
            cpu_model=host["cpu_model"],
            machine=host,  # family/model number and vector class tell Zen 3 from Zen 5
            cpus=os.cpu_count(),
            loaded=load1[1] > self.max_load,
            # CPU seconds of the job's processes / (wall seconds x ranks): below ~0.9 the ranks
            # did not have their cores (another job, or the study paused with SIGSTOP)
            cpu_share=round(cpu_share, 3),
            code=code_version(),
            finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        rec["final_error"] = final_error(rec)
        rec["resumed"] = "resumed from" in launcher  # an earlier attempt's checkpoint was used
        rec["launcher_tail"] = tail[-1500:]
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        (self.runs_dir / f"{name}.json").write_text(json.dumps(rec, indent=1))
        shutil.rmtree(work, ignore_errors=True)
        self.cache[rec["key"]] = rec
        self.log(
            f"[convergence] {name}: error {rec['final_error']:.2f}% in {elapsed:.0f} s"
            + (" (LOADED machine)" if rec["loaded"] else "")
        )
        return rec

    def _launch(self, work: Path, settings: dict) -> tuple[int, float, float]:
        """``mpiexec ... hpcsgd train --resume auto`` in ``work``: (exit code, seconds, ranks' CPU share).

        The seconds include earlier, interrupted attempts at the same run. A timeout ends the
        job's process group (exit code -1); Ctrl-C ends it too and is re-raised.
        """
        cmd = [mpiexec(), "-n", str(self.d.ranks), sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train",
               str(BASE_CONFIG), "--out", str(work), "--resume", "auto"]
        for key, value in settings.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        timeout = 4 * self.cost_seconds(settings) + 600
        t0, cpu0 = time.perf_counter(), _children_cpu_seconds()
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        )
        with open(work / "launcher.log", "a") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:  # timeout or Ctrl-C: end the job's whole process group, then report
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                if sys.exc_info()[0] is KeyboardInterrupt:
                    _add_seconds(work, time.perf_counter() - t0)
                    raise
                rc = -1
        elapsed = time.perf_counter() - t0
        cpu_share = (_children_cpu_seconds() - cpu0) / max(elapsed * self.d.ranks, 1e-9)
        return rc, _add_seconds(work, elapsed), cpu_share

    def _failed(self, name: str, work: Path, rc: int, tail: str) -> None:
        """Note a failed run; abort the study on a config error or too many failures in a row."""
        self.failures.append({"name": name, "exit_code": rc, "tail": tail[-1500:]})
        self.log(f"[convergence] {name} FAILED (exit {rc}); kept {work} for a resume; tail:\n{tail[-1500:]}")
        self._failed_in_a_row += 1
        if rc == CONFIG_ERROR_EXIT or self._failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
            why = ("a config error" if rc == CONFIG_ERROR_EXIT
                   else f"{self._failed_in_a_row} failures in a row")
            raise StudyAborted(f"{name} failed with {why}; every later run would fail alike "
                               f"(see the tail above and {work / 'launcher.log'})")

    def cost(self) -> dict:
        """Measured cost per part (sum of launch-to-exit seconds of the runs it used) and in total."""
        parts = {
            p: {"runs": len(rs), "hours": sum(r["elapsed_s"] for r in rs.values()) / 3600}
            for p, rs in self.used.items()
        }
        every = {k: r for rs in self.used.values() for k, r in rs.items()}
        loaded = sorted(r["name"] for r in every.values() if r.get("loaded"))
        return {
            "parts": parts,
            "runs": len(every),
            "hours": sum(r["elapsed_s"] for r in every.values()) / 3600,
            "loaded_runs": loaded,
            "cpu_models": sorted({cpu_label(r) for r in every.values()}),
        }

    def plan_cost(self) -> dict:
        """Predicted cost (cost model) of the runs still missing, per part and in total (hours)."""
        parts = {}
        for p in self.planned.values():
            c = parts.setdefault(p["part"], {"runs": 0, "hours": 0.0})
            c["runs"] += 1
            c["hours"] += p["seconds"] / 3600
        return {
            "parts": parts,
            "runs": len(self.planned),
            "hours": sum(p["seconds"] for p in self.planned.values()) / 3600,
        }
