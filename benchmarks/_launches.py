"""``benchmarks/allreduce.py --launches K``: the ResNet-50 gradient mean over K fresh ``mpiexec`` launches.

Why: the time of one launch can sit in one of two modes for all of its rounds
(issue 16: 19 ms or 23-26 ms for the default communicator at 2 ranks on one
node), so a single launch's median says little. This driver starts ``K``
launches one after the other; each runs only ChainerMN ``naive`` and hpcsgd's
default communicator (``--focus``), interleaved for ``--repeats`` rounds, and
writes its own JSON. Reported: per-launch medians (ms), the per-launch ratio of
the default to ChainerMN naive, min/max over launches, each rank's placement
(the CPUs it ran on during the rounds, its MB on transparent huge pages) to
correlate modes with, and a plot (``.png`` next to the JSON).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._machine import machine

DEFAULT_CASE = "hpcsgd default (hierarchical)"
BASE_CASE = "chainermn naive"


def launch_command(args, script: Path, out: Path) -> list[str]:
    """One launch: ``mpiexec [-bind-to core] -n RANKS python -m mpi4py allreduce.py --focus ...``."""
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    bind = ["-bind-to", args.bind] if args.bind != "none" else []
    return [mpiexec, *bind, "-n", str(args.ranks), sys.executable, "-m", "mpi4py", str(script),
            "--focus", "--repeats", str(args.repeats), "--out", str(out),
            "--focus-buckets", *map(str, args.focus_buckets)]


def run_launches(args, script: Path) -> int:
    """Run ``args.launches`` launches, then write the summary JSON and plot to ``args.out``."""
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="allreduce_launches_") as tmp:
        for i in range(args.launches):
            out = Path(tmp) / f"launch{i}.json"
            cmd = launch_command(args, script, out)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, timeout=args.launch_timeout, stdout=subprocess.DEVNULL)
            data = json.loads(out.read_text())
            res = data["resnet50"]
            row = {"launch": i, "wall_s": time.perf_counter() - t0,
                   "median_ms": {k: v["median_ms"] for k, v in res.items()},
                   "ratio": res[DEFAULT_CASE]["ratio_to_chainermn_naive"],
                   "placement": data.get("placement") or [], "loadavg": data["loadavg_before"][0]}
            rows.append(row)
            others = ", ".join(f"{k.replace('hierarchical f32 bucket ', 'hier ')} {v:.2f} ms"
                               for k, v in row["median_ms"].items() if k not in (BASE_CASE, DEFAULT_CASE))
            print(f"launch {i}: naive {row['median_ms'][BASE_CASE]:.2f} ms, default "
                  f"{row['median_ms'][DEFAULT_CASE]:.2f} ms, ratio {row['ratio']:.3f}, {others}, "
                  f"cpus {[p['cpus'] for p in row['placement']]}, "
                  f"THP MB {[p['anon_huge_mb'] for p in row['placement']]}, "
                  f"round trip {row['placement'][0].get('round_trip_ns') or 0:.0f} ns", flush=True)
    cases = list(rows[0]["median_ms"])
    summary = {k: {"min_ms": min(r["median_ms"][k] for r in rows),
                   "max_ms": max(r["median_ms"][k] for r in rows),
                   "median_ms": float(np.median([r["median_ms"][k] for r in rows]))} for k in cases}
    ratios = [r["ratio"] for r in rows]
    report = {
        "launches": args.launches, "ranks": args.ranks, "repeats": args.repeats, "bind": args.bind,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "cpus": os.cpu_count(), "machine": machine(),
        "ratio_min": min(ratios), "ratio_max": max(ratios), "ratio_median": float(np.median(ratios)),
        "summary": summary, "per_launch": rows,
        "command": "python benchmarks/allreduce.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "launch_command": " ".join(launch_command(args, script, Path("OUT.json"))),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    plot(report, path.with_suffix(".png"))
    print(f"ratio default / ChainerMN naive over {args.launches} launches: min {min(ratios):.3f}, "
          f"median {np.median(ratios):.3f}, max {max(ratios):.3f}; load {load_before[0]:.2f} -> "
          f"{report['loadavg_after'][0]:.2f}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_launch"]
    x = [r["launch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, color in ((BASE_CASE, "C3"), (DEFAULT_CASE, "C2")):
        a1.plot(x, [r["median_ms"][k] for r in rows], "o-", color=color, label=k)
    a1.set_xticks(x)
    a1.set_xlabel("launch")
    a1.set_ylabel("median ms per gradient mean")
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.plot(x, [r["ratio"] for r in rows], "o-", color="C0")
    a2.axhline(0.7, color="C3", ls="--", label="target 0.7")
    a2.set_xticks(x)
    a2.set_xlabel("launch")
    a2.set_ylabel("default / ChainerMN naive")
    a2.set_ylim(0, max(1.2, max(r["ratio"] for r in rows) * 1.1))
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(f"ResNet-50 gradients, {report['ranks']} ranks, {report['launches']} launches x "
                 f"{report['repeats']} rounds, bind {report['bind']}, load {report['loadavg_before'][0]:.1f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
