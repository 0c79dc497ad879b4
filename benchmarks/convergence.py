"""Large-batch convergence study on Fashion-MNIST that can answer the papers' question.

    python benchmarks/convergence.py --plan                 # runs still missing and their cost
    python benchmarks/convergence.py                        # every part, in order, resumable
    python benchmarks/convergence.py --part budget-check    # one part (any order)
    python benchmarks/convergence.py --report-only          # tables and plots from the records
    python benchmarks/convergence.py --quick                # smoke test of every part (not a result)

Parts (docs/convergence.md has the design and the cost):

* ``budget-check``: the batch-128 baseline at E and 2E epochs; the budget E is
  the smallest whose error is within 0.3 points of the error at 2E;
* ``lars-gap``: the reference settings with seeds: is LARS at 1k +1.4 points
  or +0.8 over the baseline, and does BN over 128-image micro-batches matter;
* ``fixed``: baseline vs linear scaling, Goyal, Akiba and LARS at 1k, 4k, 8k
  (and the batch nearest the late B_noise) after E epochs, LR tuned per batch,
  mean ± spread over seeds;
* ``steps``: optimizer steps to a target error vs batch (128 ... 16k), LR
  tuned per batch, with perfect scaling and B_noise;
* ``akiba-bn``: Akiba's 'batch' BN (whole-step statistics) vs its
  ChainerMN-style variant and running averages.

Every run is a 2-rank ``hpcsgd train`` job; its record is kept in
``OUT/runs/`` (default ``benchmarks/results/convergence2``) and reused, so an
interrupted study resumes; a run killed half-way resumes from its own epoch
checkpoint. Outputs in OUT: ``convergence.json``, ``convergence.md``,
``steps_to_target.png``, ``error_vs_batch.png``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convergence_study import design as D  # noqa: E402
from convergence_study import parts as P  # noqa: E402
from convergence_study import report as R  # noqa: E402
from convergence_study.runner import ROOT, Study, StudyAborted  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", choices=P.PARTS + ("all",), default=["all"])
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/convergence2[_quick]")
    p.add_argument("--plan", action="store_true", help="list the missing runs and their cost; run nothing")
    p.add_argument("--report-only", action="store_true", help="aggregate the cached records; run nothing")
    p.add_argument("--quick", action="store_true", help="tiny smoke study of every part (not a result)")
    p.add_argument("--epochs", type=float, default=None, help="force the budget (default: budget check)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="steps-to-target grid")
    p.add_argument(
        "--fixed-batches",
        type=int,
        nargs="+",
        default=None,
        help="fixed-epoch batches (default 1024 4096 8192); a subset runs those cells first",
    )
    p.add_argument("--recipes", nargs="+", choices=D.RECIPES, default=None)
    p.add_argument("--lr-factors", type=float, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument(
        "--akiba-bn-variants",
        nargs="+",
        choices=tuple(P.AKIBA_BN),
        default=None,
        help="the akiba-bn part's BN variants (default all); a subset runs those first",
    )
    p.add_argument(
        "--sec-per-epoch",
        type=float,
        default=None,
        help="cost model: seconds per 60k-image epoch (default: the median of this host's own "
        "finished runs, else per vector class: 10.5 on AVX-512, 37 on AVX2)",
    )
    p.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="5-minute load above which a run is flagged as loaded (default ranks + 1)",
    )
    return p.parse_args(argv)


def design_from(args) -> D.Design:
    d = D.quick(D.Design()) if args.quick else D.Design()
    for name, attr in (
        ("batches", "batches"),
        ("fixed_batches", "fixed_batches"),
        ("recipes", "recipes"),
        ("lr_factors", "lr_factors"),
        ("seeds", "seeds"),
        ("akiba_bn_variants", "akiba_bn_variants"),
    ):
        if getattr(args, name) is not None:
            setattr(d, attr, tuple(getattr(args, name)))
    if args.epochs is not None:
        d.epochs = args.epochs
    if args.sec_per_epoch is not None:
        d.sec_per_epoch = args.sec_per_epoch
    return d


def _interrupt(signum, frame):
    """SIGTERM (kill PID of a background study) ends the running job's process group too."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    d = design_from(args)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "convergence2_quick" if args.quick else "convergence2"
    )
    out.mkdir(parents=True, exist_ok=True)
    mode = "plan" if args.plan else "report" if args.report_only else "run"
    st = Study(d, out, mode=mode, max_load=args.max_load)
    names = P.PARTS if "all" in args.part else tuple(args.part)
    results = {}
    try:
        for name in names:
            print(f"[convergence] part {name}", flush=True)
            results[name] = P.run_part(st, name)
    except KeyboardInterrupt as e:
        print(
            f"[convergence] stopped ({e or 'interrupt'}); the running job was ended. The same command "
            "resumes: finished runs are cached, a cut run restarts from its last epoch checkpoint.",
            flush=True,
        )
        return 130
    except StudyAborted as e:
        print(f"[convergence] study stopped: {e}", flush=True)
        return 2
    cost, plan = st.cost(), st.plan_cost()
    if mode == "plan":
        print(json.dumps(plan, indent=1))
        return 0
    old = json.loads((out / "convergence.json").read_text()) if (out / "convergence.json").exists() else {}
    merged = dict(old.get("parts", {}), **results)
    per_epoch, source = D.sec_per_epoch_and_source(d, st.vector_class, st.measured_sec_per_epoch)
    if source == "host":
        source = f"this host's {st.measured_runs} finished runs"
    design = dict(vars(d), sec_per_epoch=per_epoch, sec_per_epoch_source=source, vector_class=st.vector_class)
    (out / "convergence.json").write_text(
        json.dumps(
            {
                "design": design,
                "parts": merged,
                "cost": cost,
                "still_to_run": plan,
                "failures": st.failures,
                "loadavg_at_report": os.getloadavg(),
            },
            indent=1,
            default=str,
        )
    )
    md = R.markdown(merged, cost, plan)
    (out / "convergence.md").write_text(md)
    R.plots(merged, {r["name"]: r for r in st.cache.values()}, out)
    print(md)
    return 1 if st.failures else 0


if __name__ == "__main__":
    sys.exit(main())
